"""The megatron engine's model: the run's config as a megatron-core ``TransformerConfig`` and ``GPTModel``.

``check_megatron_config`` turns every combination this engine cannot run into one ``ConfigError`` line
(before any rank starts). ``transformer_config`` maps the keys (docs/engine.md has the table);
``build_gpt`` builds this pipeline stage's ``GPTModel`` with the Transformer Engine layer spec when TE
imports and the device is CUDA, and megatron-core's local spec otherwise, with an RMSNorm that accepts
sequence parallelism (megatron's torch norm refuses it).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from triarch.config import ConfigError, TriarchConfig
from triarch.models.llama import LlamaArgs
from triarch.parallel.topology import Topology

# megatron-core logs its DDP and optimizer configs and every gradient bucket's parameter names at INFO (22 lines
# per start of a tiny model, more per layer): warnings and errors still show; our own start line names the layout
for _logger in ("megatron", "megatron_fsdp"):
    logging.getLogger(_logger).setLevel(logging.WARNING)

TE_FP8_RECIPES = ("tensorwise", "delayed", "mxfp8")  # Transformer Engine's current, delayed and MX block scaling
MEGATRON_INSTALL = "pip install 'triarch[megatron]' (megatron-core and psutil)"


def megatron_available() -> bool:
    """Whether megatron-core is installed (not imported: that is slow)."""
    return importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core") is not None


def check_megatron_config(cfg: TriarchConfig, tp: int, pp: int) -> None:
    """One ConfigError naming the value and the rule, for what this engine cannot run."""
    if not megatron_available():
        raise ConfigError(f"engine 'megatron' needs megatron-core, which is not installed: {MEGATRON_INSTALL}")
    m, par, trn = cfg.model, cfg.parallel, cfg.train
    if m.vocab_size % tp:
        raise ConfigError(f"engine 'megatron' splits the vocabulary evenly: model.vocab_size ({m.vocab_size}) must be "
                          f"divisible by parallel.tp ({tp})")
    if m.kv_heads % tp:
        raise ConfigError(f"engine 'megatron' splits query groups over tensor-parallel ranks: model.n_kv_heads "
                          f"({m.kv_heads}) must be divisible by parallel.tp ({tp}); engine: native replicates KV heads")
    if m.ffn_hidden % tp:
        raise ConfigError(f"model.ffn_hidden ({m.ffn_hidden}) must be divisible by parallel.tp ({tp})")
    if pp > 1 and par.schedule not in ("1f1b", "interleaved_1f1b"):
        raise ConfigError(f"engine 'megatron' runs megatron's 1f1b and interleaved_1f1b schedules, not "
                          f"parallel.schedule {par.schedule}; use engine: native for it")
    if pp > 1 and m.tie_embeddings:
        raise ConfigError("model.tie_embeddings with parallel.pp > 1 is not supported; untie or use pp 1")
    if cfg.data.document_masks:
        raise ConfigError("engine 'megatron' has no per-document attention without Transformer Engine's packed "
                          "sequences: set data.document_masks=false or engine: native")
    if trn.compile:
        raise ConfigError("train.compile applies to engine: native; megatron uses its own fused kernels")
    if trn.precision == "fp8":
        if trn.fp8_recipe not in TE_FP8_RECIPES:
            raise ConfigError(f"train.fp8_recipe '{trn.fp8_recipe}' is torchao's (engine: native); engine 'megatron' "
                              f"runs {', '.join(TE_FP8_RECIPES)} through Transformer Engine")
        if importlib.util.find_spec("transformer_engine") is None:
            raise ConfigError("train.precision 'fp8' on engine 'megatron' needs Transformer Engine on a CUDA GPU "
                              "(not installed here); engine: native runs fp8 through torchao")
    dp_shard = par.dp_shard if par.dp_shard > 0 else 1
    if par.dp_replicate > 1 and dp_shard > 1:
        raise ConfigError(f"engine 'megatron' has one data-parallel dimension: parallel.dp_shard (distributed "
                          f"optimizer) or parallel.dp_replicate (replicated optimizer), not both "
                          f"({par.dp_replicate}x{dp_shard})")


class ScoreHead(nn.Module):
    """The scalar head of a reward or value model in place of megatron's output layer: the final hidden states
    (gathered from their sequence-parallel shards) times a (1, hidden) weight replicated on every
    tensor-parallel rank. Every TP rank then computes the same scores and the same loss, so the weight's
    gradient is the same on each (no TP reduction: it is not tagged ``sequence_parallel``), and the gather's
    backward keeps each rank's own sequence shard of the gradient."""

    def __init__(self, config: Any, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden_size, dtype=config.params_dtype))
        self.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, hidden: torch.Tensor, weight: Any = None, runtime_gather_output: Any = None
                ) -> tuple[torch.Tensor, None]:
        if self.sequence_parallel:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return nn.functional.linear(hidden, self.weight), None


class SequenceParallelRMSNorm(nn.RMSNorm):
    """RMSNorm built from megatron's arguments that accepts sequence parallelism: its weight is tagged
    ``sequence_parallel`` so megatron all-reduces its gradient over the tensor-parallel group."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **unused: Any) -> None:
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def transformer_config(cfg: TriarchConfig, args: LlamaArgs, tp: int, pp: int, device: torch.device) -> Any:
    """The megatron-core ``TransformerConfig`` of ``cfg`` (keys mapped in docs/engine.md)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    trn = cfg.train
    bf16 = trn.precision in ("bf16", "fp8")  # fp8: bf16 parameters and activations, FP8 GEMMs inside TE layers
    fp8 = {"fp8": "hybrid", "fp8_recipe": trn.fp8_recipe} if trn.precision == "fp8" else {}  # e4m3 fwd, e5m2 grads
    recompute: dict[str, Any] = {}
    if trn.activation_checkpoint == "full":
        recompute = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    elif trn.activation_checkpoint == "selective":
        recompute = {"recompute_granularity": "selective"}
    return TransformerConfig(
        num_layers=args.n_layers, hidden_size=args.dim, num_attention_heads=args.n_heads,
        num_query_groups=args.n_kv_heads, kv_channels=args.head_dim, ffn_hidden_size=args.ffn_hidden,
        normalization="RMSNorm", layernorm_epsilon=args.norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=cfg.parallel.virtual_stages if pp > 1 and cfg.parallel.virtual_stages > 1
        else None,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        # gloo matches a batch of sends and receives between two ranks in posting order, and megatron's batched
        # p2p posts the backward send before the forward one: with two stages the tensors would be swapped
        batch_p2p_comm=device.type == "cuda",
        sequence_parallel=tp > 1 and cfg.parallel.sequence_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16, fp16=False,
        use_cpu_initialization=device.type == "cpu", perform_initialization=True,  # (it also tags TP weights)
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        calculate_per_token_loss=True, init_method_std=cfg.model.init_std, **recompute, **fp8,
    )


def uses_transformer_engine(device: torch.device) -> bool:
    """Transformer Engine's layers on CUDA when it is installed; megatron-core's local layers otherwise."""
    return device.type == "cuda" and importlib.util.find_spec("transformer_engine") is not None


def layer_spec(device: torch.device) -> Any:
    """Transformer Engine's layer spec on CUDA when TE imports, else megatron-core's local spec."""
    from megatron.core.models.gpt import gpt_layer_specs

    if uses_transformer_engine(device):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = SequenceParallelRMSNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    return spec


def build_gpt(cfg: TriarchConfig, args: LlamaArgs, topo: Topology, config: Any, *, first: bool, last: bool,
              vp_stage: int | None) -> nn.Module:
    """One pipeline stage's ``GPTModel`` (``first``/``last``: it holds the embedding / the head; ``vp_stage``:
    its virtual stage under the interleaved schedule) with megatron's random initial weights, which the engine
    overwrites with the canonical ones."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    spec = layer_spec(topo.device)
    if uses_transformer_engine(topo.device):
        block = spec
    else:  # the final norm too must accept sequence parallelism
        chunks = topo.pp * (cfg.parallel.virtual_stages if vp_stage is not None else 1)
        block = TransformerBlockSubmodules(layer_specs=[spec] * (args.n_layers // chunks),
                                           layer_norm=SequenceParallelRMSNorm)
    model = GPTModel(
        config, block, vocab_size=args.vocab_size, max_sequence_length=args.max_seq_len,
        pre_process=first, post_process=last, parallel_output=True, vp_stage=vp_stage,
        share_embeddings_and_output_weights=args.tie_embeddings and args.head == "lm", position_embedding_type="rope",
        rotary_base=int(args.rope_theta) if float(args.rope_theta).is_integer() else args.rope_theta,
    )
    if last and args.head == "score":
        model.output_layer = ScoreHead(config, args.dim)
    return model.to(topo.device)


def init_parallel_state(topo: Topology, virtual: int) -> None:
    """megatron's process groups for this Topology (once per process), checked to be the mesh's own: tensor
    parallel ranks adjacent, then data parallel, then pipeline stages, as ``Topology`` orders them."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=topo.tp,
                                                 pipeline_model_parallel_size=topo.pp,
                                                 virtual_pipeline_model_parallel_size=virtual if virtual > 1 else None)
        model_parallel_cuda_manual_seed(0)
    ours = dist.get_process_group_ranks(topo.mesh["tp"].get_group())
    theirs = dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group())
    if ours != theirs or parallel_state.get_tensor_model_parallel_world_size() != topo.tp:
        raise RuntimeError(f"megatron's tensor-parallel group {theirs} is not the run's {ours}")
    ours = dist.get_process_group_ranks(topo.dp_mesh.get_group())
    theirs = dist.get_process_group_ranks(parallel_state.get_data_parallel_group())
    if ours != theirs:
        raise RuntimeError(f"megatron's data-parallel group {theirs} is not the run's {ours}")
