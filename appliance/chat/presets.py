"""Named chat presets: a system prompt, a reasoning level and sampling, kept beside the history.

The built-in preset ("Default") is made the first time presets are read, from the chat settings
(`chat.system_prompt`, `chat.reasoning_level`, ...): a system prompt set there before presets
existed carries over into it. From then on the presets, not those settings, are what the chat
offers; the Advanced fold edits them. A conversation stores the preset it was sent with and the
values as sent (`History.set_settings`), so changing a preset later does not rewrite the past.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from appliance.chat import client as chat
from appliance.chat.history import History
from appliance.errors import BadInputError
from appliance.settings import ChatSettings

DEFAULT_NAME = "Default"
MAX_NAME = 60


@dataclass(frozen=True)
class Preset:
    id: int
    name: str
    system_prompt: str = ""
    reasoning_level: str = "medium"
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 0
    builtin: bool = False

    def options(self) -> chat.SamplingOptions:
        return chat.SamplingOptions(
            reasoning_effort=self.reasoning_level,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            system_prompt=self.system_prompt,
        )


def from_settings(settings: ChatSettings) -> Preset:
    """The built-in preset's first values: the chat settings (the old global system prompt)."""
    level = settings.reasoning_level
    return Preset(
        0,
        DEFAULT_NAME,
        system_prompt=settings.system_prompt,
        reasoning_level=level if level in chat.REASONING_LEVELS else "medium",
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_tokens=settings.max_tokens,
        builtin=True,
    )


def sent_settings(preset: Preset | None, options: chat.SamplingOptions) -> dict[str, Any]:
    """What a conversation stores about how its message was sent."""
    return {"preset": preset.name if preset else None, **asdict(options)}


class Presets:
    """The presets in the history file (one transaction per call)."""

    def __init__(
        self, history: History, defaults: Preset, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.history = history
        self.defaults = defaults
        self.clock = clock

    def list(self) -> list[Preset]:
        """The built-in preset first, then the owner's by name."""
        with self.history.transaction() as db:
            self._ensure_default(db)
            rows = db.execute(
                "SELECT * FROM presets ORDER BY builtin DESC, name COLLATE NOCASE"
            ).fetchall()
        return [_preset(r) for r in rows]

    def default(self) -> Preset:
        return self.list()[0]

    def find(self, name: str | None) -> Preset | None:
        """The preset of that name (any case), or None."""
        wanted = (name or "").strip().casefold()
        return next((p for p in self.list() if p.name.casefold() == wanted), None)

    def get(self, name: str | None) -> Preset:
        """The preset of that name; the built-in one when there is none (deleted, or no name)."""
        return self.find(name) or self.default()

    def save(self, name: str, options: chat.SamplingOptions) -> Preset:
        """Overwrite an existing preset's values with `options`."""
        preset = self.find(name)
        if preset is None:
            raise BadInputError(
                f"There is no preset called {name!r}.", hint="Save it as a new preset."
            )
        with self.history.transaction() as db:
            db.execute(
                "UPDATE presets SET system_prompt = ?, reasoning_level = ?, temperature = ?, "
                "top_p = ?, max_tokens = ?, updated_at = ? WHERE id = ?",
                (*_values(options), self.clock(), preset.id),
            )
        return self.get(preset.name)

    def create(self, name: str, options: chat.SamplingOptions) -> Preset:
        """A new preset named `name` with `options`."""
        name = " ".join(name.split())
        if not name:
            raise BadInputError("A preset needs a name.", hint="Type a name for the new preset.")
        if len(name) > MAX_NAME:
            raise BadInputError(f"A preset name may have at most {MAX_NAME} characters.")
        if self.find(name) is not None:
            raise BadInputError(
                f"A preset called {name!r} exists already.",
                hint="Choose another name, or pick it and save over it.",
            )
        now = self.clock()
        with self.history.transaction() as db:
            db.execute(
                "INSERT INTO presets (name, builtin, system_prompt, reasoning_level, "
                "temperature, top_p, max_tokens, created_at, updated_at) "
                "VALUES (?,0,?,?,?,?,?,?,?)",
                (name, *_values(options), now, now),
            )
        return self.get(name)

    def delete(self, name: str) -> None:
        """Delete one of the owner's presets (the built-in one stays); conversations that used
        it keep their settings as sent."""
        preset = self.find(name)
        if preset is None:
            return
        if preset.builtin:
            raise BadInputError("The built-in preset cannot be deleted.", hint="Edit it instead.")
        with self.history.transaction() as db:
            db.execute("DELETE FROM presets WHERE id = ?", (preset.id,))

    def _ensure_default(self, db: sqlite3.Connection) -> None:
        if db.execute("SELECT 1 FROM presets WHERE builtin = 1").fetchone():
            return
        d, now = self.defaults, self.clock()
        name = d.name
        while db.execute("SELECT 1 FROM presets WHERE name = ?", (name,)).fetchone():
            name += " (built-in)"  # an imported or hand-made preset took the name
        db.execute(
            "INSERT INTO presets (name, builtin, system_prompt, reasoning_level, temperature, "
            "top_p, max_tokens, created_at, updated_at) VALUES (?,1,?,?,?,?,?,?,?)",
            (name, *_values(d.options()), now, now),
        )


def _values(options: chat.SamplingOptions) -> tuple[str, str, float, float, int]:
    return (
        options.system_prompt,
        options.reasoning_effort,
        options.temperature,
        options.top_p,
        options.max_tokens,
    )


def _preset(row: sqlite3.Row) -> Preset:
    return Preset(
        id=row["id"],
        name=row["name"],
        system_prompt=row["system_prompt"],
        reasoning_level=row["reasoning_level"],
        temperature=row["temperature"],
        top_p=row["top_p"],
        max_tokens=row["max_tokens"],
        builtin=bool(row["builtin"]),
    )
