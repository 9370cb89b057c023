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


PACKAGES = {"nv_kvcache", "nv_kernels", "nv_models", "nv_engine"}


@pytest.mark.parametrize("package", ["nv-kernels", "nv-models", "nv-engine"])
def test_no_deep_imports_across_packages(package):
    """A package takes what it uses from another package's top level (its __init__ exports it),
    never from its modules."""
    name = package.replace("-", "_")
    for f in sorted((ROOT / "packages" / package / "src" / name).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            for m in modules:
                top = m.split(".")[0]
                assert not (top in PACKAGES - {name} and "." in m), (
                    f"{f.relative_to(ROOT)} imports {m}: import from {top} itself"
                )


def test_no_import_cycles_between_engine_modules():
    """Within nv_engine, imports (also those inside functions) form no cycle."""
    src = ROOT / "packages" / "nv-engine" / "src"
    graph: dict[str, set[str]] = {}
    for f in sorted((src / "nv_engine").rglob("*.py")):
        mod = ".".join(f.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("nv_engine")
            ):
                deps.add(node.module)
        graph[mod] = deps
    done: set[str] = set()

    def visit(mod: str, path: list[str]) -> None:
        assert mod not in path, "import cycle: " + " -> ".join([*path, mod])
        if mod in done or mod not in graph:
            return
        for dep in graph[mod]:
            visit(dep, [*path, mod])
        done.add(mod)

    for mod in graph:
        visit(mod, [])


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


def test_engine_core_package_imports_no_torch():
    """Scheduling, request state and the output stage (nv_engine/core) import no torch."""
    files = sorted((ROOT / "packages" / "nv-engine" / "src" / "nv_engine" / "core").glob("*.py"))
    assert len(files) > 3
    for f in files:
        bad = _imports(f) & {"torch", "numpy", "triton"}
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"
