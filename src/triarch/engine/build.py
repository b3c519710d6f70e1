"""Make the engine the config names (``engine``), behind the ``engine.interface.Engine`` interface."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from triarch.config import ConfigError, TriarchConfig

if TYPE_CHECKING:  # (config checks run without importing torch: the CLI and the planner call them)
    from triarch.engine.interface import Engine
    from triarch.parallel.topology import Topology


def check_engine_config(cfg: TriarchConfig) -> None:
    """The rules of the engine ``cfg`` names for this layout (``parallel`` resolved): one ConfigError line."""
    if cfg.parallel.fsdp_offload != "none" and cfg.engine != "native":
        hint = ("use deepspeed.offload_optimizer / deepspeed.offload_params" if cfg.engine == "deepspeed"
                else "use engine native (FSDP2) or deepspeed (deepspeed.offload_*) to offload")
        raise ConfigError(f"parallel.fsdp_offload '{cfg.parallel.fsdp_offload}' is FSDP2's CPU offload, run by "
                          f"engine native only, not '{cfg.engine}': {hint}")
    if cfg.engine == "megatron":
        from triarch.engine.megatron_model import check_megatron_config

        check_megatron_config(cfg, cfg.parallel.tp, cfg.parallel.pp)
    elif cfg.engine == "deepspeed":
        from triarch.engine.deepspeed_config import check_deepspeed_config

        check_deepspeed_config(cfg)
    else:
        _check_native_fp8(cfg)


def ignored_engine_keys(cfg: TriarchConfig) -> list[str]:
    """``key=value`` of each set ``deepspeed.*`` key the config's engine does not read (a config moved from
    engine deepspeed to another engine keeps its section: a warning, not an error, so it can resume there)."""
    if cfg.engine == "deepspeed":
        return []
    default = type(cfg.deepspeed)()
    return [f"deepspeed.{key}={value}" for key, value in cfg.deepspeed.model_dump().items()
            if value != getattr(default, key)]


def _check_native_fp8(cfg: TriarchConfig) -> None:
    if cfg.train.precision != "fp8":
        return
    NATIVE_RECIPES = ("tensorwise", "rowwise")  # parallel.float8.NATIVE_RECIPES (importing it loads torch)
    if cfg.train.fp8_recipe not in NATIVE_RECIPES:
        raise ConfigError(f"train.fp8_recipe '{cfg.train.fp8_recipe}' is a Transformer Engine recipe (engine: megatron "
                          f"on CUDA); engine 'native' runs {' or '.join(NATIVE_RECIPES)} (torchao)")
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("train.precision 'fp8' on engine 'native' needs torchao: pip install 'triarch[fp8]'")


def build_engine(cfg: TriarchConfig, topo: Topology, *, trainable: bool = True, head: str | None = None,
                 materialize_weights: bool = True) -> Engine:
    """This rank's engine for ``cfg`` on ``topo``. ``trainable=False``: a frozen model (reference, reward
    model) without optimizer state. ``head``: "lm" or "score", overriding the objective's (a PPO critic).
    ``materialize_weights=False``: shapes only, on the meta device (planning)."""
    if cfg.engine == "native":
        from triarch.engine.native import NativeEngine

        return NativeEngine(cfg, topo, trainable=trainable, head=head, materialize_weights=materialize_weights)
    if cfg.engine == "megatron":
        from triarch.engine.megatron import MegatronEngine

        return MegatronEngine(cfg, topo, trainable=trainable, head=head, materialize_weights=materialize_weights)
    if cfg.engine == "deepspeed":
        from triarch.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, topo, trainable=trainable, head=head, materialize_weights=materialize_weights)
    raise ConfigError(f"engine '{cfg.engine}' is not available in this version; use engine: native")
