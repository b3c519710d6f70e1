"""The commit does not grow with the world's total bytes: each rank hashes what it wrote, rank 0 only merges
digests (``hashed_by_rank`` in the commit file), and verify-on-load splits the files over the ranks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from triarch.checkpointing.commit import read_commit, share_of, verify
from triarch.launcher.local import launch_local

WORKER = str(Path(__file__).with_name("checkpoint_worker.py"))
WORLDS = (2, 4)
STEPS = (1, 2, 3)  # 1 and 2 saved async, 3 sync
RANK0_EXTRAS = (".metadata", "trainer_state.pt")  # files only rank 0 writes
BALANCE = 1.5  # the most any rank may hash, as a multiple of an even share (plus rank 0's extras)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[int, Path]:
    """The same model saved at dp_shard 2 and dp_shard 4 (one rank per shard)."""
    runs = {}
    for world in WORLDS:
        run_dir = tmp_path_factory.mktemp(f"world{world}")
        launch_local(world, [WORKER, "save", str(run_dir), str(run_dir), f"parallel.dp_shard={world}"])
        runs[world] = run_dir
    return runs


def commit_record(run_dir: Path, step: int) -> dict:
    record = read_commit(run_dir / "checkpoints" / f"step_{step}")
    assert record is not None, f"step {step} is not committed"
    return record


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", WORLDS)
def test_each_rank_hashes_about_its_share(saved: dict[int, Path], world: int) -> None:
    for step in STEPS:
        record = commit_record(saved[world], step)
        sizes = {name: entry["bytes"] for name, entry in record["files"].items()}
        total = sum(sizes.values())
        hashed = record["hashed_by_rank"]
        assert sorted(hashed) == [str(r) for r in range(world)]
        assert sum(hashed.values()) == total  # every byte hashed once, by the rank that wrote it
        extras = sum(sizes[name] for name in RANK0_EXTRAS)
        assert max(hashed.values()) <= BALANCE * total / world + extras, (step, hashed, total)
        verify(saved[world] / "checkpoints" / f"step_{step}")


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_per_rank_commit_work_shrinks_as_the_world_grows(saved: dict[int, Path]) -> None:
    most = {world: max(commit_record(saved[world], 3)["hashed_by_rank"].values()) for world in WORLDS}
    totals = {world: sum(e["bytes"] for e in commit_record(saved[world], 3)["files"].values()) for world in WORLDS}
    assert totals[4] == pytest.approx(totals[2], rel=0.1)  # the same model: about the same bytes in all
    assert most[4] < 0.7 * most[2], most  # twice the ranks: about half the hashing on the busiest one


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_corrupt_file_found_by_another_rank_falls_back_everywhere(saved: dict[int, Path], tmp_path: Path) -> None:
    world = 4
    run_dir = tmp_path / "run"
    shutil.copytree(saved[world] / "checkpoints", run_dir / "checkpoints")
    newest = run_dir / "checkpoints" / "step_3"
    share = share_of(commit_record(run_dir, 3)["files"], world - 1, world)
    name = max(share, key=lambda n: share[n]["bytes"])  # a shard the last rank checks
    raw = bytearray((newest / name).read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the sha256 can tell
    (newest / name).write_bytes(bytes(raw))
    out = tmp_path / "out"
    out.mkdir()
    launch_local(world, [WORKER, "resume", str(run_dir), str(out)])
    assert [json.loads((out / f"chosen_{r}.json").read_text()) for r in range(world)] == [2] * world
    log = (out / "log_0.txt").read_text()
    assert f"checkpoint {newest} is unusable ({newest / name} does not match its sha256" in log, log
    assert f"found by rank {world - 1}" in log, log


@pytest.mark.parametrize("files", [[1], {"a.distcp": 3}, {"a.distcp": {"bytes": "3", "sha256": "x"}}])
def test_a_commit_file_of_the_wrong_shape_is_no_commit(tmp_path: Path, files) -> None:
    from triarch.checkpointing.commit import COMMIT_FILE

    (tmp_path / COMMIT_FILE).write_text(json.dumps({"step": 2, "files": files}))
    assert read_commit(tmp_path) is None  # the step is skipped like an uncommitted one, not a traceback
