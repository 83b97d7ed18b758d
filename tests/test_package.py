"""The public surface, the layering, and the README's examples."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

import muxpool

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "muxpool"


def test_every_export_exists_and_is_listed_once():
    assert len(muxpool.__all__) == len(set(muxpool.__all__))
    for name in muxpool.__all__:
        assert getattr(muxpool, name) is not None, name


def test_importing_muxpool_pulls_in_no_optional_dependency():
    code = ("import sys, muxpool, muxpool.cli, muxpool.server, muxpool.pools; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('gevent', 'greenlet', 'dask', 'distributed', 'rich', 'matplotlib', 'uvloop')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_gevent_pool_is_loaded_on_first_use():
    pytest.importorskip("gevent")
    code = "import sys, muxpool; muxpool.GeventPool; print('gevent' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def _muxpool_imports(path: pathlib.Path) -> set[str]:
    """The muxpool modules a file imports, as dotted names relative to the package."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("muxpool"):
                found.add(module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("muxpool"))
    return found


# What each layer may import from muxpool (imports point down only).
ALLOWED = {
    "muxpool.errors": set(),
    "muxpool.framing": {"muxpool.errors"},
    "muxpool.multiplexer": {"muxpool.errors"},
    "muxpool.watchdog": set(),  # it is handed the multiplexer it watches
    "muxpool.pools": {"muxpool.errors", "muxpool.framing", "muxpool.pools"},
    "muxpool.client": {"muxpool.errors", "muxpool.framing"},
    "muxpool.config": {"muxpool.errors", "muxpool.framing"},
}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_point_down(layer):
    files = ([PACKAGE / (layer.split(".")[1] + ".py")] if (PACKAGE / (layer.split(".")[1] + ".py")).exists()
             else sorted((PACKAGE / layer.split(".")[1]).glob("*.py")))
    assert files
    for path in files:
        for module in _muxpool_imports(path):
            assert any(module == ok or module.startswith(ok + ".") for ok in ALLOWED[layer]), \
                f"{path.relative_to(ROOT)} imports {module}"


def test_the_server_reaches_engines_only_through_the_name_table():
    """Engines sit above the server core (they import it); the core finds an
    engine by name through the registry in engines/__init__.py, which imports
    engine modules lazily, never one engine module directly."""
    registry = _muxpool_imports(PACKAGE / "engines" / "__init__.py")
    assert not any(m.startswith("muxpool.engines.") for m in registry), registry
    for name in ("server.py", "connection.py", "stream.py", "compat.py"):
        for module in _muxpool_imports(PACKAGE / name):
            assert not module.startswith("muxpool.engines."), f"{name} imports {module}"


def _readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("index", range(len(_readme_examples())))
def test_readme_example_runs(index, tmp_path):
    script = tmp_path / f"example_{index}.py"
    script.write_text(_readme_examples()[index])
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=100, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_no_unused_imports_or_undefined_names():
    """pyflakes' checks (ruff F): dead imports and typos in names fail the build."""
    pytest.importorskip("ruff")
    from ruff.__main__ import find_ruff_bin

    result = subprocess.run([find_ruff_bin(), "check", "--select", "F,E9", "--no-cache", "muxpool",
                             "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
