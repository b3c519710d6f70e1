"""Every shipped example config loads and validates at its intended size; the 70B layout is measured on meta."""

from __future__ import annotations

from pathlib import Path

import pytest

from triarch.config import load_config, validate_for_world
from triarch.parallel.plan import plan_layout
from triarch.training.mfu import parameter_count

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WORLD = {"tiny": 2, "125m": 8, "1b": 8, "8b": 32, "70b": 64, "tiny_sft": 2, "tiny_rm": 2, "tiny_dpo": 2,
         "8b_sft": 32, "8b_rm": 32, "8b_dpo": 32, "tiny_ppo": 2, "tiny_grpo": 2, "8b_ppo": 32}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_example_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem
    validate_for_world(cfg, WORLD[path.stem])


@pytest.mark.parametrize(("name", "low", "high"), [("125m", 120e6, 170e6), ("1b", 0.85e9, 0.9e9), ("8b", 7.9e9, 8.1e9), ("70b", 70e9, 71e9)])
def test_named_sizes(name: str, low: float, high: float) -> None:
    assert low <= parameter_count(load_config(EXAMPLES / f"{name}.yaml").model) <= high


def test_70b_parallelized_on_meta_without_allocating() -> None:
    cfg = load_config(EXAMPLES / "70b.yaml")
    total = parameter_count(cfg.model)
    world = WORLD["70b"]
    plans = plan_layout(cfg, world)
    shards_per_stage = world // cfg.parallel.pp  # tp x dp_shard ranks split each stage's parameters
    assert len(plans) == cfg.parallel.pp
    assert sum(p.local_parameters for p in plans) * shards_per_stage == pytest.approx(total, rel=1e-3)
    assert all(p.local_parameters < 1.2e9 for p in plans)
