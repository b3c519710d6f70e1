"""Finding a test's own rank processes in /proc (never another run's: the suite may run beside others)."""

from __future__ import annotations

from pathlib import Path


def parent_pid(pid: int) -> int | None:
    """The parent of process ``pid``; None once it has gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def rank_pids(rank: int, launcher: int) -> list[int]:
    """The processes of rank ``rank`` that launcher process ``launcher`` started (``triarch train --nproc``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        is_rank = b"triarch.launcher.rank_entry" in cmdline or b"triarch.launcher.rank_main" in cmdline
        if (is_rank and f"RANK={rank}".encode() in environ
                and parent_pid(int(entry.name)) == launcher):
            pids.append(int(entry.name))
    return pids
