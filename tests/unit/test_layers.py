"""The layer rules, checked by reading every module's imports (ruff's banned-api says the same at
lint time; this holds even where someone adds a per-file exemption).

- only appliance/engine/docker_runtime.py imports docker;
- only appliance/hardware.py imports pynvml;
- appliance/ never imports gradio;
- the tabs' controllers (appliance/controllers/) import neither gradio nor ui/: the UI calls
  them, never the other way round;
- the rooms (engine, monitoring, chat, bench, gateway, ...) never import the assembly above them
  (server, services, control, commands, controllers, ui), chat/bench/gateway stand apart from the
  engine, there is no import cycle between rooms, and the simulator is standard library only.
"""

from __future__ import annotations

import ast
import functools
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


# The rooms of appliance/ and what each may lean on. A room is a package (appliance/engine/, ...)
# or a top-level module (appliance/settings.py); `ui` is the ui/ package. Each rule names the rooms
# a room must NOT import: the lower rooms never reach up into the ones that assemble them.
ASSEMBLY = {"server", "services", "control", "commands", "cli", "__main__", "controllers", "ui"}
EVERY = "*"
FORBIDDEN: dict[str, set[str]] = {
    # the base every room may use, which uses nothing above it
    "errors": {EVERY},
    "units": {EVERY},
    "settings": {EVERY},  # but errors, below
    "endpoint": {EVERY},  # but errors and settings, below
    # the rooms: none reaches the assembly; chat, bench and gateway stand alone (the engine is
    # reached through its URL and a protocol the assembly hands in)
    "engine": ASSEMBLY | {"chat", "bench", "gateway", "monitoring", "simulator"},
    "monitoring": ASSEMBLY | {"chat", "bench", "gateway", "simulator"},
    "chat": ASSEMBLY | {"engine", "bench", "gateway", "monitoring", "simulator"},
    "bench": ASSEMBLY | {"engine", "chat", "gateway", "monitoring", "simulator"},
    "gateway": ASSEMBLY | {"engine", "chat", "bench", "monitoring", "simulator"},
    "hardware": ASSEMBLY | {"engine", "chat", "bench", "gateway", "monitoring", "planner"},
    "planner": ASSEMBLY | {"engine", "chat", "bench", "gateway", "monitoring"},
    # tab logic sits below the server and the UI
    "controllers": {"server", "services", "control", "commands", "cli", "__main__", "ui"},
}
ALLOWED_BELOW = {"settings": {"errors"}, "endpoint": {"errors", "settings"}}


def room_of(rel: str) -> str:
    """`appliance/engine/board.py` -> engine; `appliance/settings.py` -> settings; `ui/*` -> ui."""
    parts = Path(rel).with_suffix("").parts
    if parts[0] == "ui":
        return "ui"
    return parts[1] if len(parts) > 1 else parts[0]


def rooms_imported(source: str) -> set[str]:
    """The rooms a module's source imports: `appliance.X...`, `from appliance import X`, `ui...`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = (
                [f"appliance.{alias.name}" for alias in node.names]
                if node.module == "appliance"
                else [node.module]
            )
        for name in names:
            parts = name.split(".")
            if parts[0] == "appliance" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] == "ui":
                found.add("ui")
    return found


@functools.cache
def room_graph() -> dict[str, set[str]]:
    """room -> the other rooms its modules import, over every product module."""
    graph: dict[str, set[str]] = {}
    for f in product_modules():
        rel = f.relative_to(REPO).as_posix()
        room = room_of(rel)
        graph.setdefault(room, set()).update(rooms_imported(f.read_text(encoding="utf-8")) - {room})
    return graph


def cycle_in(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle between rooms as a path (first room repeated at the end), or []."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(room: str) -> list[str]:
        state[room] = 1
        path.append(room)
        for nxt in sorted(graph.get(room, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[room] = 2
        return []

    for room in sorted(graph):
        if room not in state and (found := visit(room)):
            return found
    return []


def test_the_room_scanner_reads_each_form() -> None:
    source = (
        "import appliance.chat.client\nfrom appliance import gateway\n"
        "from ui import app\nfrom appliance.engine.state import EngineState\nimport json\n"
    )
    assert rooms_imported(source) == {"chat", "gateway", "ui", "engine"}
    assert room_of("appliance/engine/board.py") == "engine"
    assert room_of("appliance/settings.py") == "settings"
    assert room_of("ui/chat.py") == "ui"
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycle_between_rooms() -> None:
    graph = room_graph()
    assert {"engine", "chat", "monitoring", "bench", "controllers", "gateway", "ui"} <= set(graph)
    assert cycle_in(graph) == []


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_lower_rooms_never_import_the_rooms_above(room: str) -> None:
    imported = room_graph()[room]
    forbidden = FORBIDDEN[room]
    if EVERY in forbidden:
        offenders = imported - ALLOWED_BELOW.get(room, set())
    else:
        offenders = imported & forbidden
    assert offenders == set(), f"appliance/{room} imports {sorted(offenders)}"


def test_the_simulator_needs_only_the_standard_library() -> None:
    """`python -m appliance.simulator` runs in the slim simulator image (docker/simulator): no
    third-party package and nothing of the appliance outside the simulator."""
    import sys

    offenders = {}
    for f in sorted((REPO / "appliance" / "simulator").glob("*.py")):
        source = f.read_text(encoding="utf-8")
        outside = {
            name
            for name in imported_modules(source)
            if name not in sys.stdlib_module_names and name != "appliance"
        }
        if rooms_imported(source) - {"simulator"}:
            outside.add("appliance (outside the simulator)")
        if outside:
            offenders[f.name] = outside
    assert offenders == {}
