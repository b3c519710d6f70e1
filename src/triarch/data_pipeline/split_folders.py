"""Where a split of a prepared SFT or preference set lives: ``PATH/<split>/`` when the set was prepared
with a held-out fraction, else ``PATH`` itself, which is then the training split only."""

from __future__ import annotations

from pathlib import Path

from triarch.data_pipeline.errors import DataError

TRAIN, VALIDATION = "train", "validation"


def split_folder(path: str | Path, split: str, *, train_split: str = TRAIN, what: str = "") -> Path:
    """The prepared folder of ``split`` (module docstring); another split of a folder prepared without one is
    a one-line DataError (``what`` names the kind of set in it, e.g. ``SFT``)."""
    root = Path(path)
    if (root / split).is_dir():
        return root / split
    if split == train_split:
        return root
    kind = f"{what} " if what else ""
    raise DataError(f"{root} has no {kind}split {split!r} (no folder {root / split}); prepare it with a held-out "
                    "fraction (--eval-fraction), or set train.eval_interval=0")
