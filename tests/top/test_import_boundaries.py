"""The stages stay apart: stage 1 never imports stage 2, stage 2 never imports stage 1 or diffusers,
and ``shared`` imports neither. Each check imports every module of a package in a fresh interpreter."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import importlib, json, pkgutil, sys
package = importlib.import_module({package!r})
names = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
         if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(json.dumps({{"modules": names, "loaded": sorted(sys.modules)}}))
"""

# package -> top-level module prefixes that importing all of it must not load
FORBIDDEN = {
    "lare2.extract": ("lare2.train",),
    "lare2.train": ("lare2.extract", "diffusers", "transformers"),
    "lare2.shared": ("lare2.extract", "lare2.train", "diffusers", "transformers"),
}


def loaded_modules(package: str) -> tuple[list[str], list[str]]:
    result = subprocess.run([sys.executable, "-c", PROBE.format(package=package)], capture_output=True, text=True,
                            check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["modules"], report["loaded"]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_across_the_boundary(package: str) -> None:
    modules, loaded = loaded_modules(package)
    assert len(modules) >= 3, f"{package}: found only {modules}"  # the walk really imported the package
    crossing = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN[package])]
    assert crossing == [], f"importing {package} loaded {crossing}"


PACKAGE_FOLDERS = {"lare2.extract": "extract", "lare2.train": "train", "lare2.shared": "shared"}


def imported_names(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_across_the_boundary_even_lazily(package: str) -> None:
    folder = Path(__file__).resolve().parents[2] / PACKAGE_FOLDERS[package]
    files = sorted(folder.rglob("*.py"))
    assert files, folder
    crossing = {
        f"{path.relative_to(folder.parent)}: {name}"
        for path in files for name in imported_names(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package])
    }
    assert not crossing, sorted(crossing)
