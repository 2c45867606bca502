"""Chat history to and from files: JSON export (every version of every message), its import,
and Markdown export (the chosen path, for reading).

The JSON holds each message with an export-local `id` and its `parent`, and each conversation's
`current` (the last message of the path it showed), so an import rebuilds the same tree and the
export of the imported conversation equals the original's (its `id` aside when that id is
already taken). An import is checked whole before anything is written and written in one
transaction: a malformed file adds nothing. Version 1 files (a flat list, no versions) import as
one path.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any

from appliance.chat import documents
from appliance.chat.history import (
    COMPLETE,
    FAILED,
    INTERRUPTED,
    STOPPED,
    STREAMING,
    History,
    Message,
    StoredImage,
)
from appliance.errors import BadInputError

FORMAT = "step-station-history"
VERSION = 2
ROLES = ("user", "assistant", "system")
STATUSES = (COMPLETE, STREAMING, INTERRUPTED, STOPPED, FAILED)
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,(.*)", re.DOTALL)


# ------------------------------------------------------------------------------------ export


def export_json(history: History, conversation_id: str | None = None) -> str:
    """One conversation, or all of them (oldest first), as JSON."""
    ids = [conversation_id] if conversation_id is not None else history.conversation_ids()
    return json.dumps(
        {
            "format": FORMAT,
            "version": VERSION,
            "conversations": [_conversation_dict(history, cid) for cid in ids],
        },
        ensure_ascii=False,
        indent=2,
    )


def _conversation_dict(history: History, conversation_id: str) -> dict[str, Any]:
    row, messages = history.tree_rows(conversation_id)
    local = {m.id: index + 1 for index, m in enumerate(messages)}
    return {
        "id": row["id"],
        "title": row["title"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "settings": json.loads(row["settings"] or "{}"),
        "current": local.get(row["leaf_id"]),
        "messages": [_message_dict(m, local) for m in messages],
    }


def _message_dict(message: Message, local: dict[int, int]) -> dict[str, Any]:
    return {
        "id": local[message.id],
        "parent": local.get(message.parent_id) if message.parent_id is not None else None,
        "role": message.role,
        "content": message.content,
        "reasoning": message.reasoning,
        "status": message.status,
        "meta": message.meta,
        "created_at": message.created_at,
        "images": [
            {
                "name": i.name,
                "mime": i.mime,
                "data_url": f"data:{i.mime};base64,{base64.b64encode(i.data).decode()}",
            }
            for i in message.images
        ],
    }


def export_markdown(history: History, conversation_id: str | None = None) -> str:
    """One conversation, or all of them, as Markdown: the chosen path, images named."""
    ids = [conversation_id] if conversation_id is not None else history.conversation_ids()
    return "\n\n---\n\n".join(_conversation_markdown(history, cid) for cid in ids)


def _conversation_markdown(history: History, conversation_id: str) -> str:
    conversation = history.get_conversation(conversation_id)
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
        for document in documents.stored_in(message):  # attached files, as the model read them
            lines.extend([f"*[document: {document.chip()}]*", "", document.part(), ""])
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


# ------------------------------------------------------------------------------------ import


@dataclass(frozen=True)
class _ImportedMessage:
    local_id: int
    parent: int | None
    role: str
    content: str
    reasoning: str
    status: str
    meta: dict[str, Any]
    created_at: float
    images: list[StoredImage]


@dataclass(frozen=True)
class _ImportedConversation:
    id: str
    title: str
    created_at: float
    updated_at: float
    settings: dict[str, Any]
    current: int | None
    messages: list[_ImportedMessage]


class _Malformed(Exception):  # noqa: N818 (internal: always turned into a BadInputError)
    """What is wrong, and where, in an import file."""


def import_json(history: History, text: str) -> list[str]:
    """Add every conversation of a JSON export; the ids they got. All or nothing."""
    try:
        conversations = parse_export(text)
    except _Malformed as err:
        raise BadInputError(
            f"That file is not a Step Station chat export: {err}.",
            hint="Import a file made by Export (JSON). Nothing was imported.",
        ) from err
    added: list[str] = []
    with history.transaction() as db:
        for conversation in conversations:
            added.append(_insert(db, conversation))
    return added


def parse_export(text: str) -> list[_ImportedConversation]:
    """The conversations of an export file, checked whole; _Malformed says what is wrong."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _Malformed(f"it is not valid JSON ({err})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _Malformed(f'it has no "format": "{FORMAT}"')
    version = data.get("version")
    if version not in (1, VERSION):
        raise _Malformed(f"its version {version!r} is not one this appliance reads (1 or 2)")
    conversations = data.get("conversations")
    if not isinstance(conversations, list):
        raise _Malformed('"conversations" is not a list')
    return [_conversation(c, n + 1, version) for n, c in enumerate(conversations)]


def _conversation(raw: Any, number: int, version: int) -> _ImportedConversation:
    where = f"conversation {number}"
    if not isinstance(raw, dict):
        raise _Malformed(f"{where} is not an object")
    title = _field(raw, "title", str, where)
    messages_raw = _field(raw, "messages", list, where)
    messages: list[_ImportedMessage] = []
    seen: set[int] = set()
    for index, item in enumerate(messages_raw):
        message = _message(item, f"{where}, message {index + 1}", version, index)
        if message.local_id in seen:
            raise _Malformed(f"{where}: message id {message.local_id} appears twice")
        if message.parent is not None and message.parent not in seen:
            raise _Malformed(
                f"{where}, message {index + 1}: its parent {message.parent} is not an earlier "
                "message"
            )
        seen.add(message.local_id)
        messages.append(message)
    if version == 1:
        current = messages[-1].local_id if messages else None
    else:
        current = raw.get("current")
        if current is not None and (not isinstance(current, int) or current not in seen):
            raise _Malformed(f'{where}: "current" {current!r} is not one of its messages')
    settings = raw.get("settings", {})
    if not isinstance(settings, dict):
        raise _Malformed(f'{where}: "settings" is not an object')
    return _ImportedConversation(
        id=str(raw.get("id") or ""),
        title=title.strip() or "Imported conversation",
        created_at=_number(raw, "created_at", where),
        updated_at=_number(raw, "updated_at", where),
        settings=settings,
        current=current,
        messages=messages,
    )


def _message(raw: Any, where: str, version: int, index: int) -> _ImportedMessage:
    if not isinstance(raw, dict):
        raise _Malformed(f"{where} is not an object")
    role = _field(raw, "role", str, where)
    if role not in ROLES:
        raise _Malformed(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    status = raw.get("status", COMPLETE)
    if status not in STATUSES:
        raise _Malformed(f"{where}: status {status!r} is not one of {', '.join(STATUSES)}")
    if version == 1:  # a flat list: each message follows the one before
        local_id, parent = index + 1, (index if index else None)
    else:
        local_id = _field(raw, "id", int, where)
        parent = raw.get("parent")
        if parent is not None and not isinstance(parent, int):
            raise _Malformed(f"{where}: parent {parent!r} is not a message id")
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise _Malformed(f'{where}: "meta" is not an object')
    images_raw = raw.get("images", [])
    if not isinstance(images_raw, list):
        raise _Malformed(f'{where}: "images" is not a list')
    return _ImportedMessage(
        local_id=local_id,
        parent=parent,
        role=role,
        content=_field(raw, "content", str, where),
        reasoning=str(raw.get("reasoning") or ""),
        status=status,
        meta=meta,
        created_at=_number(raw, "created_at", where),
        images=[_image(i, f"{where}, image {n + 1}") for n, i in enumerate(images_raw)],
    )


def _image(raw: Any, where: str) -> StoredImage:
    if not isinstance(raw, dict):
        raise _Malformed(f"{where} is not an object")
    name = _field(raw, "name", str, where)
    url = _field(raw, "data_url", str, where)
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise _Malformed(f"{where}: data_url is not a base64 data: URL")
    try:
        data = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError) as err:
        raise _Malformed(f"{where}: its base64 data is damaged ({err})") from err
    return StoredImage(name, str(raw.get("mime") or match.group(1)), data)


def _field(raw: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Malformed(f'{where}: "{key}" is missing or not a {kind.__name__}')
    return value


def _number(raw: dict[str, Any], key: str, where: str) -> float:
    value = raw.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Malformed(f'{where}: "{key}" is not a number')
    return float(value)


def _insert(db: sqlite3.Connection, conversation: _ImportedConversation) -> str:
    taken = (
        conversation.id
        and db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation.id,)).fetchone()
    )
    conversation_id = conversation.id if conversation.id and not taken else uuid.uuid4().hex
    preset_name = conversation.settings.get("preset")
    preset = db.execute(
        "SELECT id FROM presets WHERE name = ?", (str(preset_name or ""),)
    ).fetchone()
    db.execute(
        "INSERT INTO conversations (id, title, created_at, updated_at, preset_id, settings) "
        "VALUES (?,?,?,?,?,?)",
        (
            conversation_id,
            conversation.title,
            conversation.created_at,
            conversation.updated_at,
            preset[0] if preset else None,
            json.dumps(conversation.settings),
        ),
    )
    ids: dict[int, int] = {}
    positions: dict[int, int] = {}
    for m in conversation.messages:
        parent = ids[m.parent] if m.parent is not None else None
        position = positions[m.parent] + 1 if m.parent is not None else 0
        status = INTERRUPTED if m.status == STREAMING else m.status  # its writer is not here
        cur = db.execute(
            "INSERT INTO messages (conversation_id, parent_id, position, role, content, "
            "reasoning, status, meta, created_at, updated_at, chosen_at) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                conversation_id,
                parent,
                position,
                m.role,
                m.content,
                m.reasoning,
                status,
                json.dumps(m.meta),
                m.created_at,
                m.created_at,
                m.created_at,
            ),
        )
        ids[m.local_id] = int(cur.lastrowid or 0)
        positions[m.local_id] = position
        for index, image in enumerate(m.images):
            db.execute(
                "INSERT INTO images (message_id, position, name, mime, data) VALUES (?,?,?,?,?)",
                (ids[m.local_id], index, image.name, image.mime, image.data),
            )
    leaf = ids.get(conversation.current) if conversation.current is not None else None
    # The path to `current` is the one last shown: where it branches, it is the one followed.
    node = leaf
    while node is not None:
        db.execute("UPDATE messages SET chosen_at = chosen_at + 1e9 WHERE id = ?", (node,))
        node = db.execute("SELECT parent_id FROM messages WHERE id = ?", (node,)).fetchone()[0]
    db.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", (leaf, conversation_id))
    return conversation_id
