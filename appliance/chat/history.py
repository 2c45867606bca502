"""Chat history in SQLite (WAL) under the data dir: conversations, messages, their images.

Every completed message is committed the moment it exists. A reply that is still streaming is
written with status `streaming` and updated periodically; if the process dies mid-stream, the next
`History` opened on the same file marks those rows `interrupted`, so nothing before them is lost
and the partial reply is kept and labelled. One appliance per host owns the file.

Messages form a tree: each has a parent (None for a conversation's first message) and a
`position`, its depth. Editing a message or regenerating a reply adds a sibling instead of
deleting the old one, so every version stays reachable; the conversation's `leaf_id` names the
last message of the chosen path, and that path is what `get_conversation` returns and what the
chat sends to the engine. A full-text index (SQLite FTS5, kept in step by triggers) covers
titles and message text.

The schema is versioned with `PRAGMA user_version`; an older file is migrated in one transaction
when it is opened (version 0: one flat list of messages per conversation, no presets).
"""

from __future__ import annotations

import html
import json
import re
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

SCHEMA_VERSION = 1

_TOKENIZER = "unicode61 remove_diacritics 2"
# Snippet highlight marks: private-use characters, so the snippet can be HTML-escaped whole and
# only these turned into <mark> tags afterwards.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"

_PRESETS = """CREATE TABLE IF NOT EXISTS presets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE COLLATE NOCASE,
    builtin INTEGER NOT NULL DEFAULT 0,
    system_prompt TEXT NOT NULL DEFAULT '',
    reasoning_level TEXT NOT NULL DEFAULT 'medium',
    temperature REAL NOT NULL,
    top_p REAL NOT NULL,
    max_tokens INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)"""

_CONVERSATIONS = """CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    leaf_id INTEGER,
    preset_id INTEGER REFERENCES presets(id) ON DELETE SET NULL,
    settings TEXT NOT NULL DEFAULT '{}'
)"""

_MESSAGES = """CREATE TABLE {name} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL DEFAULT '',
    reasoning TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{{}}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    chosen_at REAL NOT NULL DEFAULT 0
)"""

_IMAGES = """CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    mime TEXT NOT NULL,
    data BLOB NOT NULL
)"""

_INDEXES = (
    "CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, position)",
    "CREATE INDEX IF NOT EXISTS messages_by_parent ON messages(parent_id)",
    "CREATE INDEX IF NOT EXISTS images_by_message ON images(message_id, position)",
)

# The message index reads its text from `messages` (external content: no second copy of every
# reply); titles are few, so their index keeps its own copy.
_SEARCH = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS message_search USING fts5(content, "
    f"content='messages', content_rowid='id', tokenize='{_TOKENIZER}')",
    "CREATE VIRTUAL TABLE IF NOT EXISTS title_search USING fts5(conversation_id UNINDEXED, title, "
    f"tokenize='{_TOKENIZER}')",
    """CREATE TRIGGER IF NOT EXISTS message_search_insert AFTER INSERT ON messages BEGIN
        INSERT INTO message_search(rowid, content) VALUES (new.id, new.content);
    END""",
    """CREATE TRIGGER IF NOT EXISTS message_search_delete AFTER DELETE ON messages BEGIN
        INSERT INTO message_search(message_search, rowid, content)
            VALUES ('delete', old.id, old.content);
    END""",
    """CREATE TRIGGER IF NOT EXISTS message_search_update AFTER UPDATE OF content ON messages
    BEGIN
        INSERT INTO message_search(message_search, rowid, content)
            VALUES ('delete', old.id, old.content);
        INSERT INTO message_search(rowid, content) VALUES (new.id, new.content);
    END""",
    """CREATE TRIGGER IF NOT EXISTS title_search_insert AFTER INSERT ON conversations BEGIN
        INSERT INTO title_search(conversation_id, title) VALUES (new.id, new.title);
    END""",
    """CREATE TRIGGER IF NOT EXISTS title_search_delete AFTER DELETE ON conversations BEGIN
        DELETE FROM title_search WHERE conversation_id = old.id;
    END""",
    """CREATE TRIGGER IF NOT EXISTS title_search_update AFTER UPDATE OF title ON conversations
    BEGIN
        DELETE FROM title_search WHERE conversation_id = old.id;
        INSERT INTO title_search(conversation_id, title) VALUES (new.id, new.title);
    END""",
)


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
    parent_id: int | None = None
    # Its place among the versions at its position (1-based) and how many there are: `2/3`.
    version: int = 1
    versions: int = 1


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
    messages: list[Message] = field(default_factory=list)  # the chosen path, first to last
    preset_id: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # as last sent (see set_settings)


@dataclass(frozen=True)
class SearchHit:
    """A conversation that matches a search, with HTML snippets (escaped, hits in <mark>)."""

    conversation_id: str
    title: str
    updated_at: float
    snippets: list[str]


def default_path() -> Path:
    return data_dir() / "history.sqlite3"


def title_from(text: str, limit: int = 60) -> str:
    """A conversation title from its first message: first line, trimmed to `limit` characters."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if not line:
        return "New conversation"
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def fts_query(text: str) -> str:
    """The owner's search words as an FTS5 query: every word must match, the last one as a
    prefix (results follow the typing). Words are quoted, so FTS5 syntax in them is literal."""
    words = re.findall(r"\w+", text)
    return " ".join(f'"{w}"' + ("*" if i == len(words) - 1 else "") for i, w in enumerate(words))


def snippet_html(snippet: str) -> str:
    """An FTS5 snippet as HTML: everything escaped, only the highlight marks become <mark>."""
    escaped = html.escape(snippet, quote=True)
    return escaped.replace(_MARK_OPEN, "<mark>").replace(_MARK_CLOSE, "</mark>")


class History:
    """Thread-safe access to one history file. Every public method is one transaction."""

    def __init__(self, path: Path | None = None, *, clock: Any = time.time) -> None:
        self.path = path or default_path()
        self._clock = clock
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None

    # ------------------------------------------------------------------------- life cycle

    def open(self) -> History:
        """Open (creating or migrating if needed) and mark replies left `streaming` by a dead
        process."""
        with self._lock:
            if self._db is not None:
                return self
            db: sqlite3.Connection | None = None
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
                db.execute("PRAGMA busy_timeout=5000")
                _migrate(db)  # with foreign keys off: a table rebuild must not cascade
                db.execute("PRAGMA foreign_keys=ON")
            except (sqlite3.Error, OSError) as err:
                if db is not None:
                    db.close()
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
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the file (for stores that share it, such as presets)."""
        with self._tx() as db:
            yield db

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
        """Newest first; `search` (words, the last one a prefix) matches titles and the text of
        any message, every version included."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT c.id, c.title, c.created_at, c.updated_at, "
                "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS n "
                "FROM conversations c ORDER BY c.updated_at DESC, c.created_at DESC"
            ).fetchall()
            if search.strip():
                found = _matching(db, search)
                rows = [r for r in rows if r["id"] in found]
        return [
            ConversationSummary(r["id"], r["title"], r["created_at"], r["updated_at"], r["n"])
            for r in rows
        ]

    def search(self, text: str, *, per_conversation: int = 3, limit: int = 50) -> list[SearchHit]:
        """Conversations matching `text` (titles and message text), newest first, each with up
        to `per_conversation` snippets (HTML: escaped, the matched words in <mark>)."""
        query = fts_query(text)
        if not query:
            return []
        marks = (_MARK_OPEN, _MARK_CLOSE, "…")
        with self._tx() as db:
            titles = db.execute(
                "SELECT t.conversation_id AS cid, snippet(title_search, 1, ?, ?, ?, 12) AS s "
                "FROM title_search t WHERE title_search MATCH ?",
                (*marks, query),
            ).fetchall()
            texts = db.execute(
                "SELECT m.conversation_id AS cid, snippet(message_search, 0, ?, ?, ?, 16) AS s "
                "FROM message_search JOIN messages m ON m.id = message_search.rowid "
                "WHERE message_search MATCH ? ORDER BY m.conversation_id, m.id",
                (*marks, query),
            ).fetchall()
            snippets: dict[str, list[str]] = {}
            for row in [*titles, *texts]:
                kept = snippets.setdefault(row["cid"], [])
                if len(kept) < per_conversation:
                    kept.append(snippet_html(row["s"]))
            if not snippets:
                return []
            marks_q = ",".join("?" * len(snippets))
            convs = db.execute(
                f"SELECT id, title, updated_at FROM conversations WHERE id IN ({marks_q}) "
                "ORDER BY updated_at DESC, created_at DESC LIMIT ?",
                (*snippets, limit),
            ).fetchall()
        return [SearchHit(c["id"], c["title"], c["updated_at"], snippets[c["id"]]) for c in convs]

    def get_conversation(self, conversation_id: str) -> Conversation:
        """The conversation with its chosen path of messages."""
        with self._tx() as db:
            row = _conversation_row(db, conversation_id)
            tree = _Tree.load(db, conversation_id)
            path = tree.path(row["leaf_id"])
            messages = [tree.message(db, node) for node in path]
        return Conversation(
            row["id"],
            row["title"],
            row["created_at"],
            row["updated_at"],
            messages,
            row["preset_id"],
            json.loads(row["settings"] or "{}"),
        )

    def set_settings(
        self, conversation_id: str, preset_id: int | None, settings: dict[str, Any]
    ) -> None:
        """Remember the preset and the settings a message was sent with."""
        with self._tx() as db:
            db.execute(
                "UPDATE conversations SET preset_id = ?, settings = ? WHERE id = ?",
                (preset_id, json.dumps(settings), conversation_id),
            )

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
        """Append a message to the chosen path (committed before returning); it becomes the
        path's new end. After `truncate` it starts a new branch beside the messages cut off."""
        now = self._clock()
        with self._tx() as db:
            row = db.execute(
                "SELECT c.leaf_id, m.position FROM conversations c "
                "LEFT JOIN messages m ON m.id = c.leaf_id WHERE c.id = ?",
                (conversation_id,),
            ).fetchone()
            if row is None:
                raise BadInputError(
                    "That conversation does not exist (it may have been deleted).",
                    hint="Start a new conversation.",
                )
            parent = row["leaf_id"]
            position = 0 if parent is None else int(row["position"]) + 1
            cur = db.execute(
                "INSERT INTO messages (conversation_id, parent_id, position, role, content, "
                "reasoning, status, meta, created_at, updated_at, chosen_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    conversation_id,
                    parent,
                    position,
                    role,
                    content,
                    reasoning,
                    status,
                    json.dumps(meta or {}),
                    now,
                    now,
                    now,
                ),
            )
            message_id = int(cur.lastrowid or 0)
            _insert_images(db, message_id, images)
            db.execute(
                "UPDATE conversations SET updated_at = ?, leaf_id = ? WHERE id = ?",
                (now, message_id, conversation_id),
            )
            versions = db.execute(
                "SELECT COUNT(*) FROM messages WHERE conversation_id = ? AND parent_id IS ?",
                (conversation_id, parent),
            ).fetchone()[0]
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
            parent,
            versions,
            versions,
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
        """End the chosen path after its first `keep` messages (regenerate, edit).

        Nothing is deleted: the messages cut off stay as a branch, and the next `add_message`
        starts a new one beside it (`< 2/2 >` in the chat). `delete_from` really deletes."""
        with self._tx() as db:
            row = _conversation_row(db, conversation_id)
            path = _Tree.load(db, conversation_id).path(row["leaf_id"])
            leaf = path[keep - 1].id if 0 < keep <= len(path) else None
            if keep > len(path):
                return
            db.execute(
                "UPDATE conversations SET leaf_id = ?, updated_at = ? WHERE id = ?",
                (leaf, self._clock(), conversation_id),
            )

    def delete_from(self, conversation_id: str, position: int) -> None:
        """Delete the chosen path's message at `position` with everything under it (undo); the
        path then ends at its parent."""
        with self._tx() as db:
            row = _conversation_row(db, conversation_id)
            path = _Tree.load(db, conversation_id).path(row["leaf_id"])
            if not 0 <= position < len(path):
                return
            db.execute("DELETE FROM messages WHERE id = ?", (path[position].id,))
            leaf = path[position - 1].id if position > 0 else None
            db.execute(
                "UPDATE conversations SET leaf_id = ?, updated_at = ? WHERE id = ?",
                (leaf, self._clock(), conversation_id),
            )

    def switch_version(self, conversation_id: str, position: int, step: int) -> bool:
        """Show another version of the path's message at `position` (`step` -1: the one before,
        +1: the one after). Below it, the path follows the version last shown there. False when
        there is no such version."""
        with self._tx() as db:
            row = _conversation_row(db, conversation_id)
            tree = _Tree.load(db, conversation_id)
            path = tree.path(row["leaf_id"])
            if not 0 <= position < len(path):
                return False
            siblings = tree.children(path[position].parent_id)
            index = siblings.index(path[position]) + step
            if not 0 <= index < len(siblings):
                return False
            self._choose(db, conversation_id, tree, siblings[index])
        return True

    def restore_path(self, conversation_id: str) -> bool:
        """After a regenerate that stored no reply (the engine refused): a path that ends at a
        user message with replies under it shows the last one again. True when it moved."""
        with self._tx() as db:
            row = _conversation_row(db, conversation_id)
            tree = _Tree.load(db, conversation_id)
            leaf = tree.nodes.get(row["leaf_id"]) if row["leaf_id"] is not None else None
            if leaf is None or leaf.role != "user" or not tree.children(leaf.id):
                return False
            self._choose(db, conversation_id, tree, leaf)
        return True

    def _choose(
        self, db: sqlite3.Connection, conversation_id: str, tree: _Tree, node: _Node
    ) -> None:
        leaf = tree.descend(node)
        now = self._clock()
        ids = [n.id for n in tree.path(leaf.id)]
        db.execute(
            f"UPDATE messages SET chosen_at = ? WHERE id IN ({','.join('?' * len(ids))})",
            (now, *ids),
        )
        db.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", (leaf.id, conversation_id))

    # ---------------------------------------------------------------------- export/import

    def export_json(self, conversation_id: str | None = None) -> str:
        """One conversation, or all of them, as JSON: every message with its parent (all
        versions), images as base64 data URLs. `import_json` reads it back."""
        from appliance.chat import history_transfer as transfer

        return transfer.export_json(self, conversation_id)

    def export_markdown(self, conversation_id: str | None = None) -> str:
        """One conversation, or all of them, as Markdown: the chosen path, images named."""
        from appliance.chat import history_transfer as transfer

        return transfer.export_markdown(self, conversation_id)

    def import_json(self, text: str) -> list[str]:
        """Add the conversations of a JSON export; their new ids. All or nothing."""
        from appliance.chat import history_transfer as transfer

        return transfer.import_json(self, text)

    def conversation_ids(self) -> list[str]:
        """Every conversation, oldest first."""
        with self._tx() as db:
            rows = db.execute("SELECT id FROM conversations ORDER BY created_at, rowid").fetchall()
        return [r["id"] for r in rows]

    def tree_rows(self, conversation_id: str) -> tuple[sqlite3.Row, list[Message]]:
        """A conversation's row and every message (all versions) in the order they were made,
        `version`/`versions` left at 1 (for exports)."""
        with self._tx() as db:
            row = _conversation_row(db, conversation_id)
            rows = db.execute(
                "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
            ).fetchall()
            return row, [_message_from(r, db) for r in rows]


# --------------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class _Node:
    id: int
    parent_id: int | None
    role: str
    chosen_at: float


@dataclass
class _Tree:
    """A conversation's message tree, light (ids and links only), read in one query."""

    nodes: dict[int, _Node]
    kids: dict[int | None, list[_Node]]

    @classmethod
    def load(cls, db: sqlite3.Connection, conversation_id: str) -> _Tree:
        rows = db.execute(
            "SELECT id, parent_id, role, chosen_at FROM messages WHERE conversation_id = ? "
            "ORDER BY id",
            (conversation_id,),
        ).fetchall()
        nodes = {r["id"]: _Node(r["id"], r["parent_id"], r["role"], r["chosen_at"]) for r in rows}
        kids: dict[int | None, list[_Node]] = {}
        for node in nodes.values():
            kids.setdefault(node.parent_id, []).append(node)
        return cls(nodes, kids)

    def children(self, parent_id: int | None) -> list[_Node]:
        return self.kids.get(parent_id, [])

    def path(self, leaf_id: int | None) -> list[_Node]:
        path: list[_Node] = []
        node = self.nodes.get(leaf_id) if leaf_id is not None else None
        while node is not None:
            path.append(node)
            node = self.nodes.get(node.parent_id) if node.parent_id is not None else None
        return path[::-1]

    def descend(self, node: _Node) -> _Node:
        """Down from `node`, always into the child shown last (the newest among equals)."""
        while self.children(node.id):
            node = max(self.children(node.id), key=lambda n: (n.chosen_at, n.id))
        return node

    def message(self, db: sqlite3.Connection, node: _Node) -> Message:
        row = db.execute("SELECT * FROM messages WHERE id = ?", (node.id,)).fetchone()
        message = _message_from(row, db)
        siblings = self.children(node.parent_id)
        message.version, message.versions = siblings.index(node) + 1, len(siblings)
        return message


# ------------------------------------------------------------------------------------ helpers


def _conversation_row(db: sqlite3.Connection, conversation_id: str) -> sqlite3.Row:
    row = db.execute(
        "SELECT id, title, created_at, updated_at, leaf_id, preset_id, settings "
        "FROM conversations WHERE id = ?",
        (conversation_id,),
    ).fetchone()
    if row is None:
        raise BadInputError(
            "That conversation does not exist (it may have been deleted).",
            hint="Pick another one from the history list.",
        )
    return row  # type: ignore[no-any-return]


def _matching(db: sqlite3.Connection, search: str) -> set[str]:
    """Ids of the conversations whose title or any message matches `search`."""
    query = fts_query(search)
    if not query:  # no words at all (only punctuation): match titles literally
        pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = db.execute(
            "SELECT id FROM conversations WHERE title LIKE ? ESCAPE '\\'", (pattern,)
        ).fetchall()
        return {r["id"] for r in rows}
    rows = db.execute(
        "SELECT conversation_id FROM title_search WHERE title_search MATCH ? "
        "UNION SELECT m.conversation_id FROM message_search "
        "JOIN messages m ON m.id = message_search.rowid WHERE message_search MATCH ?",
        (query, query),
    ).fetchall()
    return {r[0] for r in rows}


def _insert_images(db: sqlite3.Connection, message_id: int, images: Sequence[StoredImage]) -> None:
    for index, image in enumerate(images):
        db.execute(
            "INSERT INTO images (message_id, position, name, mime, data) VALUES (?,?,?,?,?)",
            (message_id, index, image.name, image.mime, image.data),
        )


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
        parent_id=row["parent_id"],
    )


# -------------------------------------------------------------------------------- migration


def _tables(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}


def _migrate(db: sqlite3.Connection) -> None:
    """Bring the file to SCHEMA_VERSION in one transaction (nothing changes if a step fails).

    Version 0 (the first release) had conversations without preset, settings or path, and
    messages with a unique position per conversation (no versions). Its messages are rebuilt
    into the tree (each one's parent is the one before it), its conversations' paths end at
    their last message, and the search index is filled from what is there."""
    if int(db.execute("PRAGMA user_version").fetchone()[0]) >= SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        _to_version_1(db)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _to_version_1(db: sqlite3.Connection) -> None:
    existing = _tables(db)
    db.execute(_PRESETS)
    if "conversations" in existing:
        for column, kind in (
            ("leaf_id", "INTEGER"),
            ("preset_id", "INTEGER REFERENCES presets(id) ON DELETE SET NULL"),
            ("settings", "TEXT NOT NULL DEFAULT '{}'"),
        ):
            if column not in _columns(db, "conversations"):
                db.execute(f"ALTER TABLE conversations ADD COLUMN {column} {kind}")
    else:
        db.execute(_CONVERSATIONS)
    if "messages" not in existing:
        db.execute(_MESSAGES.format(name="messages"))
    elif "parent_id" not in _columns(db, "messages"):
        _rebuild_messages(db)
    db.execute(_IMAGES)
    for statement in (*_INDEXES, *_SEARCH):
        db.execute(statement)
    # Index what an older file already holds (a new file has nothing to index).
    db.execute("INSERT INTO message_search(message_search) VALUES ('rebuild')")
    db.execute("DELETE FROM title_search")
    db.execute(
        "INSERT INTO title_search(conversation_id, title) SELECT id, title FROM conversations"
    )
    broken = db.execute("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise sqlite3.IntegrityError(f"{len(broken)} rows point at nothing after migrating")


def _rebuild_messages(db: sqlite3.Connection) -> None:
    """Version 0's messages into the tree. SQLite cannot drop a UNIQUE constraint, so the table
    is made anew and copied (ids kept: images point at them), the way SQLite's manual says."""
    db.execute(_MESSAGES.format(name="messages_v1"))
    db.execute(
        "INSERT INTO messages_v1 (id, conversation_id, parent_id, position, role, content, "
        "reasoning, status, meta, created_at, updated_at, chosen_at) "
        "SELECT m.id, m.conversation_id, "
        "(SELECT p.id FROM messages p WHERE p.conversation_id = m.conversation_id "
        " AND p.position < m.position ORDER BY p.position DESC LIMIT 1), "
        "m.position, m.role, m.content, m.reasoning, m.status, m.meta, m.created_at, "
        "m.updated_at, m.created_at FROM messages m"
    )
    db.execute("DROP TABLE messages")
    db.execute("ALTER TABLE messages_v1 RENAME TO messages")
    db.execute(
        "UPDATE conversations SET leaf_id = (SELECT m.id FROM messages m "
        "WHERE m.conversation_id = conversations.id ORDER BY m.position DESC LIMIT 1)"
    )
