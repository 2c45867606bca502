"""Chat history in SQLite (WAL) under the data dir: conversations, messages, their images.

Every completed message is committed the moment it exists. A reply that is still streaming is
written with status `streaming` and updated periodically; if the process dies mid-stream, the next
`History` opened on the same file marks those rows `interrupted`, so nothing before them is lost
and the partial reply is kept and labelled. One appliance per host owns the file.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, BadInputError
from appliance.settings import create_private_file, data_dir, tighten_file

# Message status values.
COMPLETE = "complete"
STREAMING = "streaming"
INTERRUPTED = "interrupted"  # the process died (or the connection was lost) mid-stream
STOPPED = "stopped"  # the owner pressed Stop
FAILED = "failed"  # the engine answered with an error

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL DEFAULT '',
    reasoning TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (conversation_id, position)
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    mime TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, position);
CREATE INDEX IF NOT EXISTS images_by_message ON images(message_id, position);
"""


class HistoryError(ApplianceError):
    """The history database cannot be read or written."""


@dataclass(frozen=True)
class StoredImage:
    name: str
    mime: str
    data: bytes


@dataclass
class Message:
    id: int
    position: int
    role: str  # "user" | "assistant" | "system"
    content: str
    reasoning: str = ""
    status: str = COMPLETE
    meta: dict[str, Any] = field(default_factory=dict)
    images: list[StoredImage] = field(default_factory=list)
    created_at: float = 0.0


@dataclass(frozen=True)
class ConversationSummary:
    id: str
    title: str
    created_at: float
    updated_at: float
    message_count: int


@dataclass
class Conversation:
    id: str
    title: str
    created_at: float
    updated_at: float
    messages: list[Message] = field(default_factory=list)


def default_path() -> Path:
    return data_dir() / "history.sqlite3"


def title_from(text: str, limit: int = 60) -> str:
    """A conversation title from its first message: first line, trimmed to `limit` characters."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if not line:
        return "New conversation"
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


class History:
    """Thread-safe access to one history file. Every public method is one transaction."""

    def __init__(self, path: Path | None = None, *, clock: Any = time.time) -> None:
        self.path = path or default_path()
        self._clock = clock
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None

    # ------------------------------------------------------------------------- life cycle

    def open(self) -> History:
        """Open (creating if needed) and mark replies left `streaming` by a dead process."""
        with self._lock:
            if self._db is not None:
                return self
            try:
                # 0600 before SQLite opens it: SQLite gives the -wal and -shm files the mode of
                # the database file (its unix VFS copies it), so all three are private.
                create_private_file(self.path)
                for suffix in ("-wal", "-shm", "-journal"):
                    tighten_file(self.path.with_name(self.path.name + suffix))
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                db.row_factory = sqlite3.Row
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA foreign_keys=ON")
                db.execute("PRAGMA busy_timeout=5000")
                db.executescript(_SCHEMA)
            except (sqlite3.Error, OSError) as err:
                raise HistoryError(
                    f"Chat history {self.path} cannot be opened ({err}).",
                    hint="Check the disk and the file's permissions; move the file aside to start "
                    "a fresh history.",
                ) from err
            self._db = db
            self.recover_interrupted()
            return self

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db is None:
                self.open()
            db = self._db
            assert db is not None
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
            except sqlite3.Error as err:
                db.execute("ROLLBACK")
                raise HistoryError(
                    f"Chat history {self.path} could not be written ({err}).",
                    hint="Check free disk space; the conversation on screen is unchanged.",
                ) from err
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def recover_interrupted(self) -> int:
        """Mark replies still `streaming` as `interrupted` (their writer is gone)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE messages SET status = ? WHERE status = ?", (INTERRUPTED, STREAMING)
            )
            return cur.rowcount

    # ---------------------------------------------------------------------- conversations

    def create_conversation(self, title: str = "New conversation") -> str:
        now = self._clock()
        conversation_id = uuid.uuid4().hex
        with self._tx() as db:
            db.execute(
                "INSERT INTO conversations (id, title, created_at, updated_at) VALUES (?,?,?,?)",
                (conversation_id, title, now, now),
            )
        return conversation_id

    def list_conversations(self, search: str = "") -> list[ConversationSummary]:
        """Newest first; `search` matches titles, case-insensitively."""
        pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._tx() as db:
            rows = db.execute(
                "SELECT c.id, c.title, c.created_at, c.updated_at, "
                "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS n "
                "FROM conversations c WHERE c.title LIKE ? ESCAPE '\\' "
                "ORDER BY c.updated_at DESC, c.created_at DESC",
                (pattern,),
            ).fetchall()
        return [
            ConversationSummary(r["id"], r["title"], r["created_at"], r["updated_at"], r["n"])
            for r in rows
        ]

    def get_conversation(self, conversation_id: str) -> Conversation:
        with self._tx() as db:
            row = db.execute(
                "SELECT id, title, created_at, updated_at FROM conversations WHERE id = ?",
                (conversation_id,),
            ).fetchone()
            if row is None:
                raise BadInputError(
                    "That conversation does not exist (it may have been deleted).",
                    hint="Pick another one from the history list.",
                )
            messages = [
                _message_from(r, db)
                for r in db.execute(
                    "SELECT * FROM messages WHERE conversation_id = ? ORDER BY position",
                    (conversation_id,),
                ).fetchall()
            ]
        return Conversation(row["id"], row["title"], row["created_at"], row["updated_at"], messages)

    def rename(self, conversation_id: str, title: str) -> None:
        title = title.strip()
        if not title:
            raise BadInputError("A conversation title cannot be empty.", hint="Type a title.")
        with self._tx() as db:
            cur = db.execute(
                "UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id)
            )
            if cur.rowcount == 0:
                raise BadInputError("That conversation does not exist (it may have been deleted).")

    def delete(self, conversation_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # --------------------------------------------------------------------------- messages

    def add_message(
        self,
        conversation_id: str,
        role: str,
        content: str,
        *,
        reasoning: str = "",
        status: str = COMPLETE,
        meta: dict[str, Any] | None = None,
        images: Sequence[StoredImage] = (),
    ) -> Message:
        """Append a message (committed before returning) and touch the conversation."""
        now = self._clock()
        with self._tx() as db:
            row = db.execute(
                "SELECT COALESCE(MAX(position), -1) + 1 AS next FROM messages "
                "WHERE conversation_id = ?",
                (conversation_id,),
            ).fetchone()
            position = int(row["next"])
            try:
                cur = db.execute(
                    "INSERT INTO messages (conversation_id, position, role, content, reasoning, "
                    "status, meta, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        conversation_id,
                        position,
                        role,
                        content,
                        reasoning,
                        status,
                        json.dumps(meta or {}),
                        now,
                        now,
                    ),
                )
            except sqlite3.IntegrityError as err:
                raise BadInputError(
                    "That conversation does not exist (it may have been deleted).",
                    hint="Start a new conversation.",
                ) from err
            message_id = int(cur.lastrowid or 0)
            for index, image in enumerate(images):
                db.execute(
                    "INSERT INTO images (message_id, position, name, mime, data) "
                    "VALUES (?,?,?,?,?)",
                    (message_id, index, image.name, image.mime, image.data),
                )
            db.execute(
                "UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id)
            )
        return Message(
            message_id,
            position,
            role,
            content,
            reasoning,
            status,
            dict(meta or {}),
            list(images),
            now,
        )

    def update_message(
        self,
        message_id: int,
        *,
        content: str | None = None,
        reasoning: str | None = None,
        status: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Update a (streaming) message in place; only the given fields change."""
        sets: list[str] = ["updated_at = ?"]
        values: list[Any] = [self._clock()]
        for column, value in (("content", content), ("reasoning", reasoning), ("status", status)):
            if value is not None:
                sets.append(f"{column} = ?")
                values.append(value)
        if meta is not None:
            sets.append("meta = ?")
            values.append(json.dumps(meta))
        with self._tx() as db:
            db.execute(f"UPDATE messages SET {', '.join(sets)} WHERE id = ?", (*values, message_id))

    def truncate(self, conversation_id: str, keep: int) -> None:
        """Delete every message at position >= `keep` (regenerate, edit, undo)."""
        with self._tx() as db:
            db.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND position >= ?",
                (conversation_id, keep),
            )
            db.execute(
                "UPDATE conversations SET updated_at = ? WHERE id = ?",
                (self._clock(), conversation_id),
            )

    # ----------------------------------------------------------------------------- export

    def export_json(self, conversation_id: str | None = None) -> str:
        """One conversation, or all of them, as JSON (images as base64 data URLs)."""
        conversations = self._conversations_for_export(conversation_id)
        return json.dumps(
            {
                "format": "step-station-history",
                "version": 1,
                "conversations": [_conversation_dict(c) for c in conversations],
            },
            ensure_ascii=False,
            indent=2,
        )

    def export_markdown(self, conversation_id: str | None = None) -> str:
        """One conversation, or all of them, as Markdown (images named, not embedded)."""
        return "\n\n---\n\n".join(
            _conversation_markdown(c) for c in self._conversations_for_export(conversation_id)
        )

    def _conversations_for_export(self, conversation_id: str | None) -> list[Conversation]:
        if conversation_id is not None:
            return [self.get_conversation(conversation_id)]
        return [self.get_conversation(s.id) for s in reversed(self.list_conversations())]


# ------------------------------------------------------------------------------------ helpers


def _message_from(row: sqlite3.Row, db: sqlite3.Connection) -> Message:
    images = [
        StoredImage(r["name"], r["mime"], bytes(r["data"]))
        for r in db.execute(
            "SELECT name, mime, data FROM images WHERE message_id = ? ORDER BY position",
            (row["id"],),
        ).fetchall()
    ]
    return Message(
        id=row["id"],
        position=row["position"],
        role=row["role"],
        content=row["content"],
        reasoning=row["reasoning"],
        status=row["status"],
        meta=json.loads(row["meta"] or "{}"),
        images=images,
        created_at=row["created_at"],
    )


def _conversation_dict(conversation: Conversation) -> dict[str, Any]:
    return {
        "id": conversation.id,
        "title": conversation.title,
        "created_at": conversation.created_at,
        "updated_at": conversation.updated_at,
        "messages": [
            {
                "role": m.role,
                "content": m.content,
                "reasoning": m.reasoning,
                "status": m.status,
                "meta": m.meta,
                "created_at": m.created_at,
                "images": [
                    {
                        "name": i.name,
                        "mime": i.mime,
                        "data_url": f"data:{i.mime};base64,{base64.b64encode(i.data).decode()}",
                    }
                    for i in m.images
                ],
            }
            for m in conversation.messages
        ],
    }


def _conversation_markdown(conversation: Conversation) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(conversation.created_at))
    lines = [f"# {conversation.title}", "", f"*{stamp}*", ""]
    for message in conversation.messages:
        label = {"user": "You", "assistant": "Step-3.7-Flash", "system": "System"}.get(
            message.role, message.role
        )
        suffix = "" if message.status == COMPLETE else f" ({message.status})"
        lines.append(f"## {label}{suffix}")
        lines.append("")
        for image in message.images:
            lines.append(f"*[image: {image.name}]*")
        if message.images:
            lines.append("")
        if message.reasoning:
            lines.append("<details><summary>Thinking</summary>")
            lines.append("")
            lines.append(message.reasoning)
            lines.append("")
            lines.append("</details>")
            lines.append("")
        lines.append(message.content)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
