"""The layers stay apart, at any depth (functions included): proto imports nothing else of fedswarm; the
foundation (src/fedswarm/*.py: data, models, stages, p2p, settings) imports neither side nor the app; coordinator
and client never import each other nor the app or sim on top."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "fedswarm"
ON_TOP = ("fedswarm.app", "fedswarm.sim")
FORBIDDEN = {"coordinator": ("fedswarm.client", *ON_TOP), "client": ("fedswarm.coordinator", *ON_TOP),
             "proto": ("fedswarm.",), "foundation": ("fedswarm.coordinator", "fedswarm.client", *ON_TOP)}


def _files(layer: str) -> list[Path]:
    if layer == "foundation":
        return sorted(PACKAGE.glob("*.py"))
    return sorted((PACKAGE / layer).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, inside functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_it_must_not(package):
    bad = [f"{p.relative_to(ROOT)}:{line} imports {module}"
           for p in _files(package) if "_pb2" not in p.name and p.name != "__main__.py"
           for line, module in _imports(p)
           if module.startswith(FORBIDDEN[package]) and not (package == "proto" and module.startswith("fedswarm.proto"))]
    assert not bad, "\n".join(bad)


def test_test_modules_import_no_other_test_module():
    """Shared test helpers live in fedswarm.app.testing (or a helper module here), never in another test_*.py."""
    bad = [f"{p.name}:{line} imports {module}" for p in sorted((ROOT / "tests").glob("*.py"))
           for line, module in _imports(p) if module.split(".")[0].startswith("test_")]
    assert not bad, "\n".join(bad)
