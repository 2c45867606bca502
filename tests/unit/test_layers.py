"""The layer rules, checked by reading every module's imports (ruff's banned-api says the same at
lint time; this holds even where someone adds a per-file exemption).

- only appliance/engine/docker_runtime.py imports docker;
- only appliance/hardware.py imports pynvml;
- appliance/ never imports gradio;
- the tabs' controllers (appliance/controllers/) import neither gradio nor ui/: the UI calls
  them, never the other way round;
- the rooms (engine, monitoring, chat, bench, gateway, ...) never import the assembly above them
  (server, services, control, commands, controllers, ui), chat/bench/gateway stand apart from the
  engine, there is no import cycle between rooms, and the simulator is standard library only;
- the engine's state and protocol (appliance/engine/state.py, protocol.py) are a room of their
  own, "engine.api", that leans only on the base: it is how the rest sees the engine's owner, so
  chat and gateway may import it and still never reach the supervisor.
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
    # what every room knows of the engine: its state and its owner's protocol, on the base alone
    "engine.api": {EVERY},  # but errors, settings and units, below
    # the rooms: none reaches the assembly; chat, bench and gateway stand alone (the engine is
    # reached through its URL and the engine.api protocol the assembly hands an owner for)
    "engine": ASSEMBLY | {"chat", "bench", "gateway", "monitoring", "simulator"},
    "monitoring": ASSEMBLY | {"chat", "bench", "gateway", "simulator"},
    "chat": ASSEMBLY | {"engine", "bench", "gateway", "monitoring", "simulator"},
    "bench": ASSEMBLY | {"engine", "chat", "gateway", "monitoring", "simulator"},
    "gateway": ASSEMBLY | {"engine", "chat", "bench", "monitoring", "simulator"},
    "hardware": ASSEMBLY
    | {"engine", "engine.api", "chat", "bench", "gateway", "monitoring", "planner"},
    "planner": ASSEMBLY | {"engine", "engine.api", "chat", "bench", "gateway", "monitoring"},
    # tab logic sits below the server and the UI
    "controllers": {"server", "services", "control", "commands", "cli", "__main__", "ui"},
}
ALLOWED_BELOW = {
    "settings": {"errors"},
    "endpoint": {"errors", "settings"},
    "engine.api": {"errors", "settings", "units"},
}
ENGINE_API = "engine.api"
ENGINE_API_MODULES = {"state", "protocol"}  # appliance/engine/<these>.py


def room_of(rel: str) -> str:
    """`appliance/engine/board.py` -> engine; `appliance/engine/state.py` -> engine.api;
    `appliance/settings.py` -> settings; `ui/*` -> ui."""
    parts = Path(rel).with_suffix("").parts
    if parts[0] == "ui":
        return "ui"
    if parts[1:] in {("engine", name) for name in ENGINE_API_MODULES}:
        return ENGINE_API
    return parts[1] if len(parts) > 1 else parts[0]


def _room_of_module(name: str) -> str | None:
    """`appliance.engine.protocol` -> engine.api; `appliance.engine.board` -> engine;
    `ui.chat` -> ui; None outside appliance and ui."""
    parts = name.split(".")
    if parts[0] == "ui":
        return "ui"
    if parts[0] != "appliance" or len(parts) < 2:
        return None
    if parts[1] == "engine" and len(parts) > 2 and parts[2] in ENGINE_API_MODULES:
        return ENGINE_API
    return parts[1]


def rooms_imported(source: str) -> set[str]:
    """The rooms a module's source imports: `appliance.X...`, `from appliance import X`, `ui...`;
    `from appliance.engine import X` is engine.api for X in state/protocol, else engine."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = (
                [f"{node.module}.{alias.name}" for alias in node.names]
                if node.module in {"appliance", "appliance.engine"}
                else [node.module]
            )
        found.update(room for name in names if (room := _room_of_module(name)) is not None)
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
    assert rooms_imported(source) == {"chat", "gateway", "ui", "engine.api"}
    assert room_of("appliance/engine/board.py") == "engine"
    assert room_of("appliance/settings.py") == "settings"
    assert room_of("ui/chat.py") == "ui"
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_engine_api_is_a_room_of_its_own() -> None:
    """state.py and protocol.py are engine.api, however they are imported; the rest of the
    package (the supervisor, the runtimes, `appliance.engine` itself) is engine."""
    assert room_of("appliance/engine/state.py") == "engine.api"
    assert room_of("appliance/engine/protocol.py") == "engine.api"
    assert room_of("appliance/engine/supervisor.py") == "engine"
    assert rooms_imported("from appliance.engine.protocol import EngineOwner\n") == {"engine.api"}
    assert rooms_imported("import appliance.engine.state\n") == {"engine.api"}
    assert rooms_imported("from appliance.engine import state, protocol\n") == {"engine.api"}
    assert rooms_imported("from appliance.engine import Supervisor\n") == {"engine"}
    assert rooms_imported("from appliance.engine import phases, state\n") == {
        "engine",
        "engine.api",
    }
    assert rooms_imported("from appliance import engine\n") == {"engine"}
    assert rooms_imported("from appliance.engine.supervisor import Supervisor\n") == {"engine"}


def test_the_rules_catch_a_planted_import() -> None:
    """A gateway (or chat) that reaches the supervisor is caught; the protocol is allowed; the
    protocol leaning on anything but the base is caught."""
    planted = rooms_imported("from appliance.engine.supervisor import Supervisor\n")
    assert offenders("gateway", planted) == {"engine"}
    assert offenders("chat", rooms_imported("from appliance.engine import launch\n")) == {"engine"}
    allowed = rooms_imported("from appliance.engine.protocol import EngineOwner\n")
    for room in ("gateway", "chat", "monitoring", "controllers"):
        assert offenders(room, allowed) == set()
    assert offenders("engine.api", {"errors", "settings", "units"}) == set()
    assert offenders("engine.api", {"engine"}) == {"engine"}
    assert offenders("engine.api", rooms_imported("import appliance.hardware\n")) == {"hardware"}


def test_no_import_cycle_between_rooms() -> None:
    graph = room_graph()
    assert {
        "engine",
        "engine.api",
        "chat",
        "monitoring",
        "bench",
        "controllers",
        "gateway",
        "ui",
    } <= set(graph)
    assert cycle_in(graph) == []


def offenders(room: str, imported: set[str]) -> set[str]:
    """The rooms among `imported` that `room` may not import."""
    forbidden = FORBIDDEN[room]
    if EVERY in forbidden:
        return imported - ALLOWED_BELOW.get(room, set())
    return imported & forbidden


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_lower_rooms_never_import_the_rooms_above(room: str) -> None:
    found = offenders(room, room_graph()[room])
    assert found == set(), f"appliance/{room} imports {sorted(found)}"


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
