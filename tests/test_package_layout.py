"""The data package's layout holds: it imports nothing above it, and its two halves share only the top level.

Read from the source with ``ast`` (every import statement, also those inside functions), so a violation is
found without running the code path that holds it. Plus the lazy-import property a training rank relies
on: importing the stream never loads prepare's tokenizer library.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import triarch.data_pipeline as data_pipeline

PACKAGE = Path(data_pipeline.__file__).parent
ROOT = "triarch.data_pipeline"
ABOVE = ("triarch.training", "triarch.engine", "triarch.checkpointing")
HALVES = (f"{ROOT}.prepare", f"{ROOT}.stream")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join((ROOT, *(parts[:-1] if parts[-1] == "__init__" else parts)))


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # ``from pkg import module``
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


FILES = sorted(PACKAGE.rglob("*.py"))


def test_files_are_found() -> None:
    names = {_module_name(f) for f in FILES}
    assert {f"{ROOT}.manifest", f"{ROOT}.prepare.corpus", f"{ROOT}.stream.token_stream"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_imports_respect_the_layout(path: Path) -> None:
    name = _module_name(path)
    imports = _imports(path)
    above = sorted(i for i in imports if any(_within(i, a) for a in ABOVE))
    assert not above, f"{name} imports {above}: the data layer sits below training, engine and checkpointing"
    own = next((half for half in HALVES if _within(name, half)), None)
    crossing = sorted(i for i in imports for half in HALVES if half != own and _within(i, half))
    where = f"the {own.rpartition('.')[2]} half" if own else "a shared module"
    assert not crossing, (f"{name} ({where}) imports {crossing}; the halves meet only in the shared top-level "
                          f"modules (errors, fileio, manifest, shard_format, preference_format)")


def test_every_exported_name_resolves() -> None:
    for name in data_pipeline.__all__:
        assert getattr(data_pipeline, name) is not None, name


def test_the_stream_does_not_load_prepare() -> None:
    script = ("import json, sys\n"
              "import triarch.data_pipeline as d\n"
              "from triarch.data_pipeline.stream import TokenStream\n"
              "assert d.TokenStream is TokenStream and d.DataError and d.read_manifest and d.verify_folder\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('triarch', 'tokenizers')))))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert f"{ROOT}.stream.token_stream" in loaded
    assert not [m for m in loaded if _within(m, f"{ROOT}.prepare") or _within(m, "tokenizers")], loaded
