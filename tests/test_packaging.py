"""Every Python folder under src/fedswarm is a package that setuptools' find installs (a folder without an
__init__.py imports fine from an editable install and is missing from a real one)."""
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_python_folder_is_a_package_setuptools_finds():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["packages"]["find"]["where"] == ["src"]
    folders = {p.parent for p in (ROOT / "src" / "fedswarm").rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file())
    assert not missing, f"add an __init__.py to: {missing}"
