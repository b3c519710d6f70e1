"""What would break, stall or mislead on NCCL, reproduced on CPU (issue: GPU and cluster readiness).

- The control plane (checkpoint agreement, commit, verify, load, stop flags, peak memory) never runs a
  collective on a CPU tensor over the default group: a ``cuda:gloo`` default group, which like NCCL has a
  backend for CUDA tensors only, must not matter.
- A training step reads the device once, whatever the number of micro-batches.
- The foreach gradient norm equals the per-parameter float64 sum.
- Timeouts reach every process group; the peak memory of a window is the maximum over ranks.
- FSDP reduce-scatters every micro-batch by default; the no-sync variant holds nothing sharded until the
  last micro-batch.
- CPU tests run on the CPU even on a GPU host.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from triarch.config import load_config, validate_for_world
from triarch.engine.native import NativeEngine
from triarch.engine.native_grad_norm import GradNormer
from triarch.launcher.distributed import init_distributed, shutdown_distributed
from triarch.launcher.local import launch_local
from triarch.launcher.rank_main import nccl_environment
from triarch.parallel.topology import Topology

WORKER = str(Path(__file__).with_name("control_plane_worker.py"))
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")


def _run(mode: str, tmp_path: Path, nproc: int = 2) -> list[dict]:
    launch_local(nproc, [WORKER, mode, str(tmp_path)])
    return [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_control_plane_works_when_the_default_group_cannot_reduce_cpu_tensors(tmp_path: Path) -> None:
    ranks = _run("nccl_like", tmp_path)
    for result in ranks:
        # the reproduction holds: a CPU collective on this default group fails exactly as on NCCL
        assert result["cpu_on_default"].startswith("No backend type associated with device type cpu")
        assert result["saved"] == {"sync": {"step": 1, "loaded_step": 1}, "async": {"step": 1, "loaded_step": 1}}
        assert result["stop_agreed"] is True  # rank 1 asked, both agree
    assert ranks[0]["peak"] == ranks[1]["peak"]
    for mode in ("sync", "async"):
        assert (tmp_path / mode / "checkpoints" / "step_1" / "COMMITTED.json").is_file()


class _HostReads(TorchFunctionMode):
    """Counts calls that copy a tensor's value to the host (on a GPU each is a device synchronisation)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if getattr(func, "__name__", "") in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _engine(micro: int, extra: list[str] | None = None) -> NativeEngine:
    cfg = validate_for_world(load_config(None, [
        "model.vocab_size=128", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.ffn_hidden=64", "model.seq_len=8", f"train.micro_batch_size={micro}", "train.global_batch_size=8",
        "train.warmup_steps=1", "train.grad_clip=0.1", *(extra or [])]), 1)
    return NativeEngine(cfg, Topology.build(torch.device("cpu"), pp=1, dp_replicate=1, dp_shard=1, tp=1))


@pytest.fixture()
def world_of_one():
    init_distributed(torch.device("cpu"))
    yield
    shutdown_distributed()


def _reads_per_step(engine: NativeEngine) -> list[int]:
    gen = torch.Generator().manual_seed(0)
    counts = []
    for step in range(1, 4):
        batch = torch.randint(0, 128, (8, 9), generator=gen)
        labels = batch[:, 1:].clone()
        labels[0, :3] = -100  # a loss mask: the normalisation by counted tokens is exercised
        with _HostReads() as reads:
            engine.train_step(batch[:, :-1], labels, step=step, stop_requested=False)
        counts.append(reads.count)
    return counts


def test_host_reads_per_step_do_not_grow_with_micro_batches(world_of_one) -> None:
    one, eight = _reads_per_step(_engine(micro=8)), _reads_per_step(_engine(micro=1))
    assert one == eight, (one, eight)
    assert max(one[1:]) == 1, one  # the fused [loss, tokens, norm, stop] read (step 1 also sets up state)


def test_foreach_norm_equals_the_per_parameter_float64_sum(world_of_one) -> None:
    engine = _engine(micro=4)
    gen = torch.Generator().manual_seed(3)
    for p in (p for c in engine.chunks for p in c.parameters()):
        p.grad = torch.randn(p.shape, generator=gen)
    reference = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for c in engine.chunks for p in c.parameters()))
    fast = math.sqrt(float(GradNormer(engine.chunks, engine.topo).local_square_sum()))
    assert fast == pytest.approx(reference, rel=1e-12)


def test_masked_labels_give_the_mean_over_counted_tokens_and_its_gradient(world_of_one) -> None:
    """Gradients are normalised after the backward (host-known scale, corrected by the counted tokens):
    the update must equal plain autograd of the mean loss over counted tokens."""
    engine = _engine(micro=2, extra=["train.grad_clip=0"])
    gen = torch.Generator().manual_seed(5)
    batch = torch.randint(0, 128, (8, 9), generator=gen)
    labels = batch[:, 1:].clone()
    labels[:, :5] = -100
    model = engine.chunks[0]
    logits = model(batch[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    square = sum(float(g.double().pow(2).sum()) for g in want.values())
    captured = {}
    engine.optimizer.step = lambda: captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
    result = engine.train_step(batch[:, :-1], labels, step=1)
    assert result.loss == pytest.approx(float(loss), rel=1e-6)
    assert result.grad_norm == pytest.approx(math.sqrt(square), rel=1e-5)
    for name, grad in want.items():
        torch.testing.assert_close(captured[name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_timeouts_reach_every_process_group(tmp_path: Path) -> None:
    ranks = _run("timeouts", tmp_path)
    first = ranks[0]
    assert first["groups"] >= 2  # the default group and the mesh's tensor-parallel group at least
    assert first["startup"] == [77.0] and first["after_first_step"] == [3.0]
    assert first["error"] is not None and first["failed_after_s"] < 10, first  # not the backend's 30 minutes


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_window_peak_memory_is_the_maximum_over_ranks(tmp_path: Path) -> None:
    ranks = _run("peak_memory", tmp_path)
    expected = [max(r["mine"][i] for r in ranks) for i in range(2)]
    assert ranks[1]["mine"][0] > ranks[0]["mine"][0]  # rank 1 really peaked higher
    assert ranks[0]["window"] == ranks[1]["window"] == expected


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["every_microbatch", "last_microbatch"])
def test_fsdp_gradients_between_micro_batches(mode: str, tmp_path: Path) -> None:
    ranks = _run(mode, tmp_path)
    for result in ranks:
        assert result["n_micro"] == 2
        grads = result["before_second_microbatch"]
        if mode == "every_microbatch":  # reduce-scattered already: each rank holds half of each gradient
            assert all(g is not None for g in grads)
            assert sum(local for local, _ in grads) * 2 == sum(full for _, full in grads)
        else:  # the unsharded gradient lives inside FSDP until the last micro-batch
            assert all(g is None for g in grads)
    assert ranks[0]["loss"] == ranks[1]["loss"]


def test_flight_recorder_dumps_into_the_run_directory(tmp_path: Path) -> None:
    env = nccl_environment(tmp_path)
    assert int(env["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0
    for key in ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"):
        assert env[key].startswith(str(tmp_path.resolve() / "flight_recorder") + os.sep)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3" and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"


def test_cpu_tests_see_no_gpu() -> None:
    """A test not marked ``gpu`` (this one) hands its subprocesses no visible CUDA device, so the CLI's
    ``train.device: auto`` puts every rank on the CPU even on a GPU host."""
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    code = "import torch; from triarch.launcher.distributed import pick_device; print(pick_device('auto'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "cpu", done.stderr[-2000:]
