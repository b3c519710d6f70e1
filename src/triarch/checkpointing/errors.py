"""The checkpoint error type, in a module of its own so that commands which never touch a checkpoint (``triarch
prepare``, ``status``) can catch it without importing torch.distributed.checkpoint."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder or file and the reason."""
