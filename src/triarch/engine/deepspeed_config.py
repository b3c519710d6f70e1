"""The DeepSpeed JSON of a run on ``engine: deepspeed``, and the rules of that engine (one-line ConfigErrors).

Torch-free on purpose: the CLI checks a config before any rank starts. The JSON is built from the run's own
keys (batch sizes, clipping, precision, the ``deepspeed:`` section); an existing DeepSpeed JSON named by
``deepspeed.config_file`` is merged under it. A key both set must agree (or be DeepSpeed's ``"auto"``): a
silent override is how a user loses a day finding out why their batch size changed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from triarch.config import ConfigError, TriarchConfig
from triarch.training.model_flops import parameter_count

DEEPSPEED_INSTALL = "pip install 'triarch[deepspeed]'"
# DeepSpeed's top-level config keys (its docs' "config-json" page, 0.19): DeepSpeed ignores keys it does not
# know, so a typo ("zero_optimisation") would silently train without ZeRO; triarch refuses it instead
KNOWN_TOP_LEVEL = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "fp16", "bf16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "steps_per_print", "wall_clock_breakdown", "dump_state", "flops_profiler",
    "activation_checkpointing", "aio", "communication_data_type", "seq_parallel_communication_data_type",
    "data_types", "comms_logger", "tensorboard", "wandb", "csv_monitor", "comet", "elasticity", "checkpoint",
    "data_efficiency", "curriculum_learning", "compression_training", "autotuning", "memory_breakdown",
    "pipeline", "nebula", "hybrid_engine", "graph_harvesting", "compile", "timers", "weight_quantization",
    "use_data_before_expert_parallelism", "disable_allgather", "sparse_attention", "load_universal_checkpoint",
    "use_node_local_storage", "dataloader_drop_last", "monitor_config", "quantize_training", "eigenvalue",
    "progressive_layer_drop", "mics_shard_size", "mics_hierarchical_params_gather", "tensor_parallel",
})
# triarch owns these: its optimizer (AdamW, train.*) and learning-rate schedule (engine/lr_schedule.py)
OWNED_SECTIONS = ("optimizer", "scheduler")
ZERO_KEYS = frozenset({
    "stage", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "use_multi_rank_bucket_allreduce",
    "allgather_partitions", "allgather_bucket_size", "overlap_comm", "load_from_fp32_weights", "elastic_checkpoint",
    "offload_param", "offload_optimizer", "sub_group_size", "cpu_offload_param", "cpu_offload_use_pin_memory",
    "cpu_offload", "prefetch_bucket_size", "stage3_prefetch_bucket_size", "param_persistence_threshold",
    "stage3_param_persistence_threshold", "model_persistence_threshold", "stage3_model_persistence_threshold",
    "max_live_parameters", "stage3_max_live_parameters", "max_reuse_distance", "stage3_max_reuse_distance",
    "gather_16bit_weights_on_model_save", "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save", "module_granularity_threshold", "use_all_reduce_for_fetch_params",
    "stage3_use_all_reduce_for_fetch_params", "ignore_unused_parameters", "legacy_stage1", "round_robin_gradients",
    "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients", "zeropp_loco_param", "mics_shard_size", "mics_hierarchical_params_gather",
    "memory_efficient_linear", "pipeline_loading_checkpoint", "override_module_apply", "log_trace_cache_warnings",
    "enable_sanity_checks",
})


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def check_deepspeed_config(cfg: TriarchConfig) -> None:
    """The rules of ``engine: deepspeed`` for this layout (``parallel`` resolved): one ConfigError line."""
    if not deepspeed_available():
        raise ConfigError(f"engine 'deepspeed' needs DeepSpeed, which is not installed: {DEEPSPEED_INSTALL}")
    par, trn, ds = cfg.parallel, cfg.train, cfg.deepspeed
    if par.tp > 1 or par.pp > 1:
        raise ConfigError(f"engine 'deepspeed' runs ZeRO data parallelism only (parallel.tp {par.tp}, parallel.pp "
                          f"{par.pp}); tensor and pipeline parallelism run on engine native or megatron")
    if par.dp_replicate > 1:
        raise ConfigError(f"engine 'deepspeed' shards over all data-parallel ranks: parallel.dp_replicate "
                          f"({par.dp_replicate}) must be 1 (parallel.dp_shard is the ZeRO degree); hybrid "
                          f"sharding runs on engine native (HSDP)")
    if trn.precision == "fp8":
        raise ConfigError("train.precision 'fp8' runs on engine native (torchao) or megatron (Transformer Engine), "
                          "not deepspeed; use bf16")
    if trn.compile:
        raise ConfigError("train.compile applies to engine: native; set it false on engine 'deepspeed'")
    if trn.activation_checkpoint == "selective" and ds.zero_stage == 3:  # measured: the recompute then fails
        raise ConfigError("train.activation_checkpoint 'selective' does not run under deepspeed.zero_stage 3 (ZeRO-3 "
                          "gathers parameters inside the recomputed block, which selective recompute cannot replay): "
                          "use full, or zero_stage 1 or 2")
    if ds.offload_params != "none" and ds.zero_stage != 3:
        raise ConfigError(f"deepspeed.offload_params '{ds.offload_params}' partitions parameters, which only ZeRO "
                          f"stage 3 does: set deepspeed.zero_stage=3 (it is {ds.zero_stage})")
    if ds.optimizer == "deepspeed_cpu_adam" and ds.offload_optimizer == "none":
        raise ConfigError("deepspeed.optimizer 'deepspeed_cpu_adam' steps optimizer state held in host memory: "
                          "set deepspeed.offload_optimizer=cpu (or nvme), or use deepspeed.optimizer=torch_adamw")
    if "nvme" in (ds.offload_optimizer, ds.offload_params):
        if ds.nvme_path is None:
            raise ConfigError("deepspeed offload to 'nvme' needs deepspeed.nvme_path (an existing folder on the "
                              "NVMe drive)")
        if not Path(ds.nvme_path).is_dir():
            raise ConfigError(f"deepspeed.nvme_path '{ds.nvme_path}' is not an existing folder: offload to nvme "
                              f"writes its swap files there")
    deepspeed_json(cfg, n_microbatches=1)  # the merge rules of deepspeed.config_file


def _user_json(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config_file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"deepspeed.config_file '{path}' is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config_file '{path}' must hold a JSON object, not {type(data).__name__}")
    return data


def _merge(ours: dict[str, Any], theirs: dict[str, Any], path: str, where: str = "") -> dict[str, Any]:
    """``theirs`` under ``ours``: keys only they set are kept; keys both set must agree or be "auto"."""
    out = dict(theirs)
    for key, value in ours.items():
        name = f"{where}{key}"
        if key not in theirs or theirs[key] == "auto":
            out[key] = value
        elif isinstance(value, dict) and isinstance(theirs[key], dict):
            out[key] = _merge(value, theirs[key], path, f"{name}.")
        elif theirs[key] != value:
            raise ConfigError(f"deepspeed.config_file '{path}' sets {name} to {json.dumps(theirs[key])} but this "
                              f"run's config makes it {json.dumps(value)}: remove it from the file, set it to "
                              f"\"auto\", or change the run's key")
    return out


def _offload(device: str, nvme_path: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"device": device}
    if device == "nvme":
        entry["nvme_path"] = nvme_path
    return entry


def deepspeed_json(cfg: TriarchConfig, *, n_microbatches: int) -> dict[str, Any]:
    """The DeepSpeed config dict of ``cfg`` (``parallel`` resolved) with ``n_microbatches`` per step."""
    trn, ds = cfg.train, cfg.deepspeed
    # A bucket larger than all the gradients is never filled, yet ZeRO-1/2 allocate it whole at every micro-step
    # (reduce_bucket_size elements: 2 GB per rank in fp32 at the default 5e8, whatever the model's size): cap
    # both buckets at the model's parameter count (even, as DeepSpeed requires), which changes no reduction.
    cap = parameter_count(cfg.model) + parameter_count(cfg.model) % 2
    zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": ds.overlap_comm,
                            "reduce_bucket_size": min(ds.reduce_bucket_size, cap)}
    if ds.zero_stage < 3:
        zero["allgather_bucket_size"] = min(ds.allgather_bucket_size, cap)
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(ds.offload_optimizer, ds.nvme_path)
    if ds.offload_params != "none":
        zero["offload_param"] = _offload(ds.offload_params, ds.nvme_path)
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": trn.micro_batch_size,
        "gradient_accumulation_steps": n_microbatches,
        "gradient_clipping": trn.grad_clip,
        "bf16": {"enabled": trn.precision == "bf16"},
        "zero_optimization": zero,
        # the client optimizer (torch AdamW) runs on the offloaded state as it is: no DeepSpeed op compiles
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if trn.precision == "bf16":  # fp32 gradient accumulation and reduction, as the native engine's bf16 scheme
        ours["data_types"] = {"grad_accum_dtype": "fp32"}
        ours["communication_data_type"] = "fp32"
    if ds.config_file is None:
        return ours
    theirs = _user_json(ds.config_file)
    unknown = sorted(set(theirs) - KNOWN_TOP_LEVEL)
    if unknown:
        raise ConfigError(f"deepspeed.config_file '{ds.config_file}' has unknown DeepSpeed key(s) "
                          f"{', '.join(unknown)} (DeepSpeed would ignore them silently)")
    for section in OWNED_SECTIONS:
        if section in theirs:
            raise ConfigError(f"deepspeed.config_file '{ds.config_file}' has '{section}': triarch runs its own AdamW "
                              f"and learning-rate schedule (train.lr, train.warmup_steps, ...); remove it")
    fp16 = theirs.get("fp16")
    if isinstance(fp16, dict) and fp16.get("enabled") not in (False, "auto", None):
        raise ConfigError(f"deepspeed.config_file '{ds.config_file}' enables fp16: triarch trains in fp32 or bf16 "
                          f"(train.precision) and DeepSpeed refuses fp16 on CPU; remove it and set "
                          f"train.precision=bf16")
    zero_theirs = theirs.get("zero_optimization", {})
    if not isinstance(zero_theirs, dict):
        raise ConfigError(f"deepspeed.config_file '{ds.config_file}': zero_optimization must be an object")
    unknown = sorted(set(zero_theirs) - ZERO_KEYS)
    if unknown:
        raise ConfigError(f"deepspeed.config_file '{ds.config_file}' has unknown zero_optimization key(s) "
                          f"{', '.join(unknown)}")
    for key, ours_device in (("offload_optimizer", ds.offload_optimizer), ("offload_param", ds.offload_params)):
        if key not in zero_theirs:
            continue
        entry = zero_theirs[key]
        if not isinstance(entry, dict):
            raise ConfigError(f"deepspeed.config_file '{ds.config_file}': zero_optimization.{key} must be an object "
                              f"like {{\"device\": \"cpu\"}}, not {entry!r}")
        device = entry.get("device", "none")
        if device not in ("auto", ours_device):  # triarch checks offload (stage, nvme_path): it must be ours
            ours_key = "offload_optimizer" if key == "offload_optimizer" else "offload_params"
            raise ConfigError(f"deepspeed.config_file '{ds.config_file}' sets zero_optimization.{key}.device "
                              f"{device!r} but deepspeed.{ours_key} is '{ours_device}': set "
                              f"deepspeed.{ours_key}={device} (and deepspeed.nvme_path for nvme) instead")
    if "train_batch_size" in theirs and theirs["train_batch_size"] not in ("auto", trn.global_batch_size):
        raise ConfigError(f"deepspeed.config_file '{ds.config_file}' sets train_batch_size to "
                          f"{theirs['train_batch_size']} but this run's train.global_batch_size is "
                          f"{trn.global_batch_size}")
    merged = _merge(ours, {k: v for k, v in theirs.items() if k != "train_batch_size"}, ds.config_file)
    return merged
