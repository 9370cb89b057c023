"""Dependencies point one way: kvcache -> engine; kernels -> models -> engine."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STDLIB = set(sys.stdlib_module_names)

# package dir -> (import name, top-level modules it must not import)
RULES = {
    "nv-kvcache": ("nv_kvcache", None),  # allow-list instead: stdlib + xxhash
    "nv-kernels": ("nv_kernels", {"nv_models", "nv_engine", "nv_kvcache"}),
    "nv-models": ("nv_models", {"nv_engine", "nv_kvcache"}),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(RULES))
def test_static_imports(package):
    name, forbidden = RULES[package]
    files = sorted((ROOT / "packages" / package / "src" / name).rglob("*.py"))
    assert files
    for f in files:
        imported = _imports(f)
        if forbidden is None:
            bad = {m for m in imported if m not in STDLIB and m not in {"xxhash", name}}
        else:
            bad = imported & forbidden
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"


def test_kvcache_import_loads_no_torch_or_numpy():
    code = (
        "import sys, nv_kvcache; bad = {'torch', 'numpy'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernels_and_models_import_without_engine():
    code = (
        "import sys, nv_models, nv_kernels; assert 'nv_engine' not in sys.modules; "
        "assert 'nv_kvcache' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
