"""The engine interface holds: everything outside ``triarch.engine`` reaches an engine through it, the native
engine implements all of it, and the objectives sit below every engine and the loop.

Imports are read from the source with ``ast`` (also those inside functions), so a violation is found
without running the code path that holds it.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import triarch
from triarch.config import ConfigError, TriarchConfig, validate_for_world
from triarch.engine.interface import Engine
from triarch.engine.native import NativeEngine

SRC = Path(triarch.__file__).parent
ENGINE_NEUTRAL = {"triarch.engine", "triarch.engine.build", "triarch.engine.interface", "triarch.engine.model_args",
                  "triarch.engine.generation", "triarch.engine.sampling", "triarch.engine.lr_schedule",
                  "triarch.engine.adamw", "triarch.engine.step_inputs"}
BELOW_OBJECTIVES = ("triarch.engine", "triarch.training", "triarch.rlhf", "triarch.checkpointing",
                    "triarch.launcher", "triarch.parallel", "triarch.slurm")


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (``from pkg import name`` counts as ``pkg.name`` too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


FILES = sorted(SRC.rglob("*.py"))


def test_only_the_interface_is_seen_outside_the_engine_package() -> None:
    offenders = {}
    for path in FILES:
        name = _module(path)
        if _within(name, "triarch.engine"):
            continue
        seen = sorted(i for i in _imports(path) if _within(i, "triarch.engine")
                      and not any(i == n or i.startswith(f"{n}.") for n in ENGINE_NEUTRAL if n != "triarch.engine")
                      and i != "triarch.engine")
        if seen:
            offenders[name] = seen
    assert not offenders, f"modules outside triarch.engine import an engine's internals: {offenders}"


def test_one_engine_does_not_import_another() -> None:
    engines = {"native": "triarch.engine.native", "megatron": "triarch.engine.megatron",
               "deepspeed": "triarch.engine.deepspeed"}
    for path in FILES:
        name = _module(path)
        for engine, prefix in engines.items():
            if not name.startswith(prefix):
                continue
            others = [p for e, p in engines.items() if e != engine]
            crossing = sorted(i for i in _imports(path) if any(i.startswith(o) for o in others))
            assert not crossing, f"{name} imports {crossing}: shared pieces belong in the engine-neutral modules"


def test_objectives_sit_below_the_engines_and_the_loop() -> None:
    files = [p for p in FILES if _within(_module(p), "triarch.objectives")]
    assert len(files) >= 6
    for path in files:
        above = sorted(i for i in _imports(path) if any(_within(i, b) for b in BELOW_OBJECTIVES))
        assert not above, f"{_module(path)} imports {above}: objectives sit below engines, loop and stages"


def _protocol_methods() -> dict[str, inspect.Signature]:
    names = [n for n, v in vars(Engine).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))]
    return {n: inspect.signature(getattr(Engine, n)) if callable(getattr(Engine, n)) else None for n in names}


def test_the_native_engine_implements_every_method_of_the_interface() -> None:
    methods = _protocol_methods()
    assert {"train_step", "eval_step", "forward_rows", "generate", "checkpoint_state", "model_state",
            "state_loaded", "schedule_state", "load_schedule_state", "set_schedule_step", "full_parameters",
            "n_microbatches", "local_parameter_count", "close"} <= set(methods)
    for name, signature in methods.items():
        ours = getattr(NativeEngine, name, None)
        assert ours is not None, f"NativeEngine has no {name}"
        if signature is None:
            continue
        params = inspect.signature(ours).parameters
        for param in signature.parameters.values():
            assert param.name in params, f"NativeEngine.{name} lacks parameter {param.name}"
            assert params[param.name].kind == param.kind, f"NativeEngine.{name}({param.name}) is another kind"
    for attribute in ("cfg", "topo", "args", "trainable"):
        assert attribute in Engine.__annotations__


def test_every_engine_implements_every_method_of_the_interface() -> None:
    pytest.importorskip("deepspeed")
    pytest.importorskip("megatron.core")
    from triarch.engine.deepspeed import DeepSpeedEngine
    from triarch.engine.megatron import MegatronEngine

    for engine in (DeepSpeedEngine, MegatronEngine):
        for name, signature in _protocol_methods().items():
            ours = getattr(engine, name, None)
            assert ours is not None, f"{engine.__name__} has no {name}"
            if signature is not None:
                params = inspect.signature(ours).parameters
                missing = [p.name for p in signature.parameters.values() if p.name not in params]
                assert not missing, f"{engine.__name__}.{name} lacks {missing}"


def test_deepspeed_missing_is_a_one_line_error_naming_the_install(monkeypatch) -> None:
    from triarch.engine import deepspeed_config

    monkeypatch.setattr(deepspeed_config, "deepspeed_available", lambda: False)
    cfg = TriarchConfig.model_validate({"engine": "deepspeed"})
    install = r"needs DeepSpeed, which is not installed: pip install 'triarch\[deepspeed\]'"
    with pytest.raises(ConfigError, match=install):
        validate_for_world(cfg, 1)
