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


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, root: pathlib.Path) -> bool:
    where = root.joinpath(*name.split("."))
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def _muxpool_imports(path: pathlib.Path, root: pathlib.Path = ROOT) -> set[str]:
    """The muxpool modules a file imports, as dotted names: at module level, inside
    functions, under ``TYPE_CHECKING``, and ``importlib.import_module("muxpool...")``
    with a literal name. ``from . import x`` counts as importing the module ``x``."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "muxpool" or module.startswith("muxpool."):
                for alias in node.names:  # a submodule, or a name defined in ``module``
                    name = f"{module}.{alias.name}"
                    found.add(name if _is_module(name, root) else module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "muxpool")
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and node.args[0].value.split(".")[0] == "muxpool"
              and (getattr(node.func, "attr", None) == "import_module"
                   or getattr(node.func, "id", None) in ("import_module", "__import__"))):
            found.add(node.args[0].value)
    return found


def _modules() -> list[str]:
    return sorted(_module_name(path) for path in PACKAGE.rglob("*.py"))


def _path(module: str) -> pathlib.Path:
    relative = pathlib.Path(*module.split(".")[1:])
    return (PACKAGE / relative / "__init__.py") if (PACKAGE / relative).is_dir() else \
        (PACKAGE / relative).with_suffix(".py")


# What each layer may import from muxpool: design.md's picture, imports point
# down only. A name allows that module and, for a package, everything in it.
# A module belongs to the longest layer name it equals or sits inside ("muxpool"
# itself, the public surface, is only muxpool/__init__.py).
_BELOW_CORE = {"muxpool.errors", "muxpool.framing", "muxpool.multiplexer", "muxpool.watchdog",
               "muxpool.stats", "muxpool.tls", "muxpool.handlers", "muxpool.config", "muxpool.pools",
               "muxpool.calls", "muxpool.context", "muxpool.conn", "muxpool.logs",
               "muxpool.metrics", "muxpool.lifecycle", "muxpool.systemd", "muxpool.gevent_signals"}
_CORE = {"muxpool.server", "muxpool.connection", "muxpool.stream", "muxpool.compat",
         "muxpool.server_metrics", "muxpool.serving", "muxpool.clocks", "muxpool.closing"}
_ANYTHING = {"muxpool"}
ALLOWED = {
    "muxpool.errors": set(),
    "muxpool.framing": {"muxpool.errors"},
    "muxpool.multiplexer": {"muxpool.errors"},
    "muxpool.watchdog": set(),  # it is handed the multiplexer it watches
    "muxpool.stats": set(),
    "muxpool.logs": set(),  # stdlib only: formatters the CLI installs, workers use
    "muxpool.tls": {"muxpool.errors"},
    "muxpool.handlers": {"muxpool.errors"},
    "muxpool.systemd": {"muxpool.errors"},  # stdlib only: sd_listen_fds and sd_notify
    "muxpool.config": {"muxpool.errors", "muxpool.framing", "muxpool.systemd"},
    "muxpool.calls": {"muxpool.errors"},  # calling a handler: what every engine shares
    "muxpool.gevent_signals": set(),  # imported by gevent's engine and pool only
    "muxpool.lifecycle": {"muxpool.calls", "muxpool.systemd"},  # start/shutdown/context manager, for every server
    "muxpool.conn": set(),  # the handler's view: a Protocol
    "muxpool.context": {"muxpool.config", "muxpool.multiplexer", "muxpool.stats"},
    "muxpool.pools": {"muxpool.errors", "muxpool.framing", "muxpool.pools", "muxpool.gevent_signals"},
    # Collectors read the snapshots pools and the server's stats keep; the server may serve them.
    "muxpool.metrics": {"muxpool.errors", "muxpool.pools", "muxpool.stats"},
    # The server core: engines by name only (the registry; see the next tests).
    **{core: _BELOW_CORE | _CORE | {"muxpool.engines"} for core in _CORE},
    # Engines take the handler and the connection as arguments, and report back
    # through a callback: they never import the server (test_no_engine_imports_the_server).
    "muxpool.engines": _BELOW_CORE | {"muxpool.engines"},
    # Prefork composes Servers: a supervisor, and a Server in each worker.
    "muxpool.prefork": _BELOW_CORE | _CORE | {"muxpool.engines", "muxpool.prefork", "muxpool.lifecycle",
                                              "muxpool.logs"},
    "muxpool.client": {"muxpool.errors", "muxpool.framing"},
    "muxpool.loadtest": {"muxpool.errors", "muxpool.framing", "muxpool.handlers", "muxpool.server",
                         "muxpool.serving", "muxpool.loadtest"},  # it may start servers to compare
    "muxpool": _BELOW_CORE | {"muxpool.server", "muxpool.serving", "muxpool.client", "muxpool.prefork"},  # the public surface
    "muxpool.cli": _ANYTHING,
    "muxpool.cli_bench": _ANYTHING,
    "muxpool.cli_errors": _ANYTHING,
    "muxpool.__main__": _ANYTHING,
}


def _layer(module: str) -> str | None:
    owners = [layer for layer in ALLOWED
              if module == layer or (layer != "muxpool" and module.startswith(layer + "."))]
    return max(owners, key=len, default=None)


def _allowed(module: str, allowed: set[str]) -> bool:
    return any(module == ok or module.startswith(ok + ".") for ok in allowed)


def test_every_module_in_the_package_has_a_layer():
    modules = _modules()
    assert len(modules) > 40 and "muxpool.prefork.worker" in modules
    assert [m for m in modules if _layer(m) is None] == []


def test_the_import_scanner_sees_every_kind_of_import(tmp_path):
    """The checks below are only as good as this: each import here must be seen."""
    fake = tmp_path / "muxpool" / "engines"
    fake.mkdir(parents=True)
    (tmp_path / "muxpool" / "server.py").write_text("")
    (fake / "x.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import muxpool.framing\n"
        "from ..errors import Boom\n"
        "from .. import server, VERSION\n"
        "if TYPE_CHECKING:\n    from ..connection import Connection\n"
        "def later():\n    from muxpool.stream import StreamConnection\n"
        "    importlib.import_module('muxpool.compat')\n"
        "import os, json\n")
    assert _muxpool_imports(fake / "x.py", root=tmp_path) == {
        "muxpool.framing", "muxpool.errors", "muxpool.server", "muxpool", "muxpool.connection",
        "muxpool.stream", "muxpool.compat"}


@pytest.mark.parametrize("module", _modules())
def test_imports_point_down(module):
    allowed = ALLOWED[_layer(module)]
    wrong = sorted(m for m in _muxpool_imports(_path(module)) if not _allowed(m, allowed))
    assert wrong == [], f"{module} (layer {_layer(module)}) imports {wrong}"


def _engine_modules() -> list:
    return [module for module in _modules()
            if module == "muxpool.engines" or module.startswith("muxpool.engines.")]


@pytest.mark.parametrize("module", _engine_modules())
def test_no_engine_imports_the_server(module):
    """Issue 13's seam: an engine runs what it is handed and reports back through a
    callback; it never builds or calls a Server. The package root counts too: it
    imports the server."""
    imports = _muxpool_imports(_path(module))
    assert not _allowed("muxpool.server", imports) and "muxpool" not in imports, \
        f"{module} imports {sorted(imports)}"


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
