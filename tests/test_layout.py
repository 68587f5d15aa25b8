"""The package's layout: its public names resolve, its ``python -m`` commands are kept, and no two of its files
import each other (an import at any depth counts, as in a circle of a picture of the package)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import rlhf_lightning

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlhf_lightning"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (the longest module prefix of each import)."""
    modules = {_module(p) for p in PACKAGE.rglob("*.py")}
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != _module(path):
                    edges.add(name)
        graph[_module(path)] = edges
    return graph


def test_no_two_files_import_each_other():
    graph = _imports()
    mutual = sorted({tuple(sorted((a, b))) for a, edges in graph.items() for b in edges if a in graph.get(b, ())})
    assert mutual == []


def test_no_top_level_module_but_the_command_doors():
    tops = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert tops == ["__init__", "report", "rm_eval", "summary"]


@pytest.mark.parametrize("name", sorted(set(rlhf_lightning.__all__) - {"__version__"}))
def test_public_name_resolves(name):
    assert getattr(rlhf_lightning, name) is getattr(importlib.import_module(rlhf_lightning._HOME[name]), name)


def test_import_is_light():
    code = ("import sys, rlhf_lightning; "
            "print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["rm_eval", "summary", "report"])
def test_command_doors_keep_their_main(command):
    door = importlib.import_module(f"rlhf_lightning.{command}")
    assert door.main is importlib.import_module(f"rlhf_lightning.evaluation.{command}").main
