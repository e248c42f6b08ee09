"""The public API: what ``polytask`` exports, that every public class, function and method says what it does, and
that the API reference (``scripts/api_docs``, pdoc) builds.

Public means the names in the ``__all__`` of the modules ``scripts/api_docs`` documents (``MODULES``; a module
without ``__all__``: the classes and functions it defines whose names do not start with ``_``), and the public
methods and properties those classes define themselves.
"""

import dataclasses
import importlib
import inspect
import runpy
import subprocess
import sys
import typing
from functools import cached_property
from pathlib import Path

import pytest

import polytask

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "api_docs"
API_DOCS = runpy.run_path(str(SCRIPT))
MODULES = API_DOCS["MODULES"]


def public_names(module) -> list[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [n for n, v in vars(module).items() if not n.startswith("_")
            and (inspect.isclass(v) or inspect.isfunction(v)) and v.__module__ == module.__name__]


def own_doc(obj) -> str:
    """The docstring ``obj`` was written with: not one inherited from a base class (pydantic's BaseModel, Exception)
    and not the signature that ``dataclass`` or ``NamedTuple`` writes when there is none."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if inspect.isclass(obj) and doc and (dataclasses.is_dataclass(obj) or issubclass(obj, tuple)) \
            and doc.startswith(f"{obj.__name__}("):
        return ""
    return (doc or "").strip()


def members(cls) -> dict[str, object]:
    """The public methods and properties ``cls`` defines (not those of its bases)."""
    out = {}
    for name, attr in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(attr, staticmethod | classmethod):
            attr = attr.__func__
        if isinstance(attr, property):
            attr = attr.fget
        elif isinstance(attr, cached_property):
            attr = attr.func
        if inspect.isfunction(attr):
            out[name] = attr
    return out


def undocumented() -> list[str]:
    missing, seen = [], set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in public_names(module):
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or id(obj) in seen:
                continue
            seen.add(id(obj))
            where = f"{obj.__module__}.{obj.__qualname__}"
            if not own_doc(obj):
                missing.append(where)
            if inspect.isclass(obj):
                for m, fn in members(obj).items():
                    # an override may keep the docstring of the method it overrides (inspect.getdoc finds it)
                    if not own_doc(fn) and not inspect.getdoc(getattr(obj, m)):
                        missing.append(f"{where}.{m}")
    return missing


def test_every_public_class_function_and_method_has_a_docstring():
    missing = undocumented()
    assert not missing, f"{len(missing)} public names without a docstring:\n" + "\n".join(sorted(missing))


def test_the_walker_sees_undocumented_names():
    @dataclasses.dataclass
    class Plain:
        x: int

        def method(self) -> int:
            return self.x

    class Tuple(typing.NamedTuple):
        a: int

    assert not own_doc(Plain) and not own_doc(Tuple) and not own_doc(Plain.method)
    assert list(members(Plain)) == ["method"]
    assert own_doc(polytask.JointStep) and "backward" in members(polytask.JointStep)


def test_the_top_level_exports_resolve_and_dir_agrees_with_all():
    for module_name in ("polytask", "polytask.engine"):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module_name}.{name}"
        listed = {n for n in dir(module) if not n.startswith("_") and not inspect.ismodule(getattr(module, n))}
        assert listed == set(module.__all__) - {"__version__"}, module_name
    for name in ("JointStep", "fit", "load", "run", "load_config", "merge", "Task", "TaskSuite", "ConfigError"):
        assert name in polytask.__all__
    assert polytask.METHODS.names() and "upgrad" in polytask.METHODS  # the joint methods are registered on access
    assert "ties" in polytask.MERGE_METHODS


def test_importing_polytask_and_its_engine_stays_free_of_torch():
    code = "import sys, polytask, polytask.engine, polytask.flows; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_the_api_reference_builds(tmp_path):
    out = tmp_path / "api"
    r = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "index.html").exists()
    pages = {p.relative_to(out).as_posix() for p in out.rglob("*.html")}
    assert {"polytask.html", "polytask/aggregators.html", "polytask/merging.html", "polytask/engine.html"} <= pages
    top = (out / "polytask.html").read_text()
    for name in ("JointStep", "fit", "load", "load_config", "PolytaskError"):
        assert f'id="{name}"' in top, name
    assert "aggregate" in (out / "polytask" / "aggregators.html").read_text()
    assert 'id="train_job"' in (out / "polytask" / "engine.html").read_text()
    config = (out / "polytask" / "config.html").read_text()
    assert "SuiteConfig(name=" in config and "PydanticUndefined" not in config  # factory defaults shown as values


def test_a_pdoc_warning_fails_the_build_and_keeps_the_old_output(tmp_path, monkeypatch):
    (tmp_path / "brokenpkg.py").write_text('"""A module whose __all__ names what it lacks."""\n__all__ = ["missing"]\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "api"
    out.mkdir()
    (out / "index.html").write_text("previous build")
    with pytest.raises(UserWarning, match=r"'missing' in brokenpkg\.__all__"):
        API_DOCS["build"](out, ("brokenpkg",))
    assert (out / "index.html").read_text() == "previous build"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api", "brokenpkg.py"]  # no temporary left behind
