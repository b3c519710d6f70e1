"""Loading the small pickled files of a checkpoint (trainer state, RNG states) without running code.

``torch.load(weights_only=True)`` unpickles only tensors, numbers, strings, lists, tuples and dicts (plus
numpy's array reconstruction, allow-listed here for RNG states saved by earlier versions), so a
checkpoint folder from someone else cannot execute anything on load. Its integrity manifest is no
protection against that: whoever wrote the folder wrote the manifest too. DCP's own ``.metadata`` is
read by torch.distributed.checkpoint itself (also a restricted unpickler in torch 2.13); the tensor data
files hold raw bytes.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triarch.checkpointing.commit import CheckpointError


def _numpy_array_types() -> list[Any]:
    """What unpickling a plain numpy array needs (old RNG files held numpy's generator state)."""
    core = getattr(np, "_core", None) or np.core
    types: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        types += [getattr(dtypes, name) for name in ("UInt32DType", "Int64DType", "Float64DType") if hasattr(dtypes, name)]
    return types


def load_plain(path: Path) -> Any:
    """Unpickle ``path`` allowing only data (never code); a file that needs more is refused in one line."""
    try:
        with torch.serialization.safe_globals(_numpy_array_types()):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} holds more than plain data (tensors, numbers, strings); refusing to "
                              f"unpickle it ({_offender(str(err))})") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path} cannot be read: {str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__}") from None


def _offender(message: str) -> str:
    """The line of torch's refusal that names what the file wanted to import."""
    for line in message.splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.split("error:", 1)[-1].strip()[:200]
    return "not plain data"


# DCP reads its ``.metadata`` with plain ``pickle.load`` (torch 2.13), which would run whatever a crafted file
# asks for. Before any DCP read, the file is unpickled here with only the classes DCP's metadata uses.
_DCP_METADATA_GLOBALS: dict[str, set[str] | None] = {
    "torch.distributed.checkpoint.metadata": None,  # every class of DCP's metadata module
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    """The metadata asks for a global outside :data:`_DCP_METADATA_GLOBALS` (other unpickling errors: damage)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _DCP_METADATA_GLOBALS.get(module, set())
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if allowed is None or name in allowed:
            return super().find_class(module, name)
        raise _ForbiddenGlobal(f"{module}.{name}")


def check_dcp_metadata(step_dir: Path) -> None:
    """Refuse (one line) a DCP ``.metadata`` that would import anything but DCP's metadata classes."""
    path = Path(step_dir) / ".metadata"
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir} is not a readable distributed checkpoint: it has no .metadata") from None
    except _ForbiddenGlobal as err:
        raise CheckpointError(f"{path} asks to import {err}, which DCP's metadata never does; refusing to "
                              "load it") from None
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, AttributeError, ImportError, IndexError,
            KeyError, TypeError) as err:
        raise CheckpointError(f"{step_dir} is not a readable distributed checkpoint: {path.name} is damaged "
                              f"({type(err).__name__})") from None
