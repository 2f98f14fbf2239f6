"""Typing: the .pyi stubs of the Cython modules cover what the modules hold,
py.typed ships, and tests/typed_usage.py (checked by mypy --strict in
.ci/lint) runs. .ci/lint also runs mypy.stubtest on the same stubs."""
from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Dict, Set

import pytest

import netpoll

PKG = Path(netpoll.__file__).resolve().parent
CORE = PKG / "_core"
BENCH = PKG / "bench"
HERE = Path(__file__).resolve().parent
# Compiled modules with a stub: the core's, and the bench package's load generator.
STUBS = {f"netpoll._core.{p.stem}": p for p in CORE.glob("*.pyi")}
STUBS.update({f"netpoll.bench.{p.stem}": p for p in BENCH.glob("*.pyi")})
MODULES = sorted(STUBS)

# Names that exist only in the stubs (type aliases) or only at run time
# (Cython internals).
STUB_ONLY = {"BytesLike", "Address", "LoadgenResult"}
RUNTIME_ONLY = {"__test__", "__pyx_capi__"}


def _stub(module: str) -> ast.Module:
    return ast.parse(STUBS[module].read_text())


def _stub_names(tree: ast.Module) -> Dict[str, Set[str]]:
    """Top-level names -> member names (empty for functions and variables);
    members of stub base classes defined in the same stub are included."""
    out: Dict[str, Set[str]] = {}
    bases: Dict[str, Set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members: Set[str] = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
            out[node.name] = members
            bases[node.name] = {b.id for b in node.bases if isinstance(b, ast.Name)}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = set()
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = set()
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = set()
    for name, bs in bases.items():
        for b in bs:
            out[name] |= out.get(b, set())
    return out


def test_every_compiled_module_has_a_stub() -> None:
    built = {f"netpoll.{d.name}.{p.name.split('.')[0]}" for d in (CORE, BENCH)
             for p in d.iterdir() if p.suffix in (".so", ".pyd") or p.name.endswith(".pyx")}
    assert "netpoll.bench._loadgen" in built, "the load generator is not built"
    assert built <= set(MODULES), f"modules without a .pyi stub: {sorted(built - set(MODULES))}"
    assert (PKG / "py.typed").is_file()


@pytest.mark.parametrize("module", MODULES)
def test_stub_matches_module(module: str) -> None:
    mod = importlib.import_module(module)
    stub = _stub_names(_stub(module))
    runtime = {n for n in vars(mod) if not (n.startswith("__") and n.endswith("__"))}
    runtime -= RUNTIME_ONLY
    # Public module-level names (and the private ones a stub chose to describe).
    public = {n for n in runtime if not n.startswith("_")
              and not isinstance(getattr(mod, n), types.ModuleType)
              and getattr(getattr(mod, n), "__module__", mod.__name__) == mod.__name__}
    missing = sorted(public - set(stub))
    assert not missing, f"{module}: not in the stub: {missing}"
    extra = sorted(set(stub) - runtime - STUB_ONLY)
    assert not extra, f"{module}.pyi describes names the module lacks: {extra}"
    for cls_name, members in stub.items():
        cls = getattr(mod, cls_name, None)
        if not isinstance(cls, type):
            continue
        # Members of bases from other modules are checked against their own stub.
        local = [k for k in cls.__mro__ if k.__module__ == mod.__name__]
        foreign = {n for k in cls.__mro__ if k not in local for n in vars(k)}
        own = {n for k in local for n in vars(k) if not n.startswith("_")} - foreign
        missing = sorted(own - members)
        assert not missing, f"{module}.{cls_name}: members not in the stub: {missing}"
        absent = sorted(n for n in members if not hasattr(cls, n) and not n.startswith("_"))
        # Attributes set on instances (cdef public/readonly show up on the type).
        assert not absent, f"{module}.{cls_name}: stub members missing at run time: {absent}"


def test_public_names_are_exported() -> None:
    for name in netpoll.__all__:
        assert hasattr(netpoll, name), name
    assert isinstance(netpoll.__version__, str) and netpoll.__version__[0].isdigit()
    from importlib.metadata import version
    assert version("netpoll") == netpoll.__version__      # matches pyproject.toml
    assert len(set(netpoll.__all__)) == len(netpoll.__all__)
    public = {n for n in vars(netpoll) if not n.startswith("_")
              and not isinstance(getattr(netpoll, n), types.ModuleType)}
    assert public <= set(netpoll.__all__), sorted(public - set(netpoll.__all__))


def test_typed_usage_runs() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(PKG.parent), os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, str(HERE / "typed_usage.py")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
