"""The layer rules, checked by reading every module's imports (ruff's banned-api says the same at
lint time; this holds even where someone adds a per-file exemption).

- only appliance/engine/docker_runtime.py imports docker;
- only appliance/hardware.py imports pynvml;
- appliance/ never imports gradio;
- the tabs' controllers (appliance/controllers/) import neither gradio nor ui/: the UI calls
  them, never the other way round.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ALLOWED = {
    "docker": {"appliance/engine/docker_runtime.py"},
    "pynvml": {"appliance/hardware.py"},
}


def imported_modules(source: str) -> set[str]:
    """Top-level package names a module imports: import statements, `from` imports (absolute),
    and `importlib.import_module("...")` / `__import__("...")` with a literal name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            arg = node.args[0]
            if (
                name in {"import_module", "__import__"}
                and isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
            ):
                found.add(arg.value.split(".")[0])
    return found


def product_modules() -> list[Path]:
    files = [*(REPO / "appliance").rglob("*.py"), *(REPO / "ui").rglob("*.py")]
    return sorted(f for f in files if "__pycache__" not in f.parts)


def test_the_scanner_sees_every_import_form() -> None:
    source = """
import docker.types as t
from pynvml import nvmlInit
import importlib
importlib.import_module("gradio.themes")
x = __import__("docker")
from . import sibling
"""
    assert imported_modules(source) >= {"docker", "pynvml", "gradio", "importlib"}
    assert "sibling" not in imported_modules(source)


def test_there_are_modules_to_check() -> None:
    names = {f.relative_to(REPO).as_posix() for f in product_modules()}
    assert "appliance/hardware.py" in names
    assert "appliance/profiles.py" in names


@pytest.mark.parametrize("library", sorted(ALLOWED))
def test_only_one_module_imports(library: str) -> None:
    offenders = [
        rel
        for f in product_modules()
        if library in imported_modules(f.read_text(encoding="utf-8"))
        and (rel := f.relative_to(REPO).as_posix()) not in ALLOWED[library]
    ]
    assert offenders == [], f"{library} may only be imported by {sorted(ALLOWED[library])}"


def test_hardware_is_the_nvml_module() -> None:
    source = (REPO / "appliance" / "hardware.py").read_text(encoding="utf-8")
    assert "pynvml" in imported_modules(source)


def test_appliance_never_imports_gradio() -> None:
    offenders = [
        f.relative_to(REPO).as_posix()
        for f in sorted((REPO / "appliance").rglob("*.py"))
        if "gradio" in imported_modules(f.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_controllers_import_neither_gradio_nor_the_ui() -> None:
    controllers = sorted((REPO / "appliance" / "controllers").glob("*.py"))
    names = {f.stem for f in controllers}
    assert {"chat", "model", "dashboard", "sharing"} <= names  # one per tab
    offenders = {
        f.relative_to(REPO).as_posix(): found
        for f in controllers
        if (found := imported_modules(f.read_text(encoding="utf-8")) & {"gradio", "ui"})
    }
    assert offenders == {}


def test_pyproject_bans_the_same_imports() -> None:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    for library in ("docker", "pynvml", "gradio"):
        assert f'"{library}".msg' in text
