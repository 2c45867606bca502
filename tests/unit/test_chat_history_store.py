"""The history store's versions, search, migration and JSON round trip, on real SQLite files."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from appliance.chat import history as h
from appliance.errors import BadInputError

# The schema of the first release (version 0), as it created history files: a file made with
# it must open under the new code and lose nothing.
SCHEMA_V0 = """
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


@pytest.fixture
def store(tmp_path: Path) -> h.History:
    history = h.History(tmp_path / "history.sqlite3").open()
    yield history
    history.close()


def exchange(store: h.History, cid: str, question: str, answer: str) -> None:
    store.add_message(cid, "user", question)
    store.add_message(cid, "assistant", answer)


def contents(store: h.History, cid: str) -> list[str]:
    return [m.content for m in store.get_conversation(cid).messages]


# ---------------------------------------------------------------------------------- migration


def old_file(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_V0)
    db.execute("INSERT INTO conversations VALUES ('c1', 'Old trip plans', 1.0, 5.0)")
    db.execute("INSERT INTO conversations VALUES ('c2', 'Empty one', 2.0, 2.0)")
    rows = [
        (10, "c1", 0, "user", "Where to go in Porto?", "", "complete", "{}", 1.0, 1.0),
        (
            11,
            "c1",
            1,
            "assistant",
            "Try the azulejos.",
            "thinking",
            "complete",
            '{"level": "high"}',
            2.0,
            2.0,
        ),
        (12, "c1", 2, "user", "And food?", "", "complete", "{}", 3.0, 3.0),
        (13, "c1", 3, "assistant", "Francesinha, partly", "", "streaming", "{}", 4.0, 4.0),
    ]
    db.executemany("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
    db.execute("INSERT INTO images VALUES (1, 10, 0, 'map.png', 'image/png', x'89504e47')")
    db.commit()
    db.close()


def test_a_version_0_file_opens_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    old_file(path)
    store = h.History(path).open()
    conv = store.get_conversation("c1")
    assert (conv.title, conv.created_at, conv.updated_at) == ("Old trip plans", 1.0, 5.0)
    assert [(m.id, m.position, m.role, m.content) for m in conv.messages] == [
        (10, 0, "user", "Where to go in Porto?"),
        (11, 1, "assistant", "Try the azulejos."),
        (12, 2, "user", "And food?"),
        (13, 3, "assistant", "Francesinha, partly"),
    ]
    assert conv.messages[0].images == [h.StoredImage("map.png", "image/png", b"\x89PNG")]
    assert conv.messages[1].reasoning == "thinking"
    assert conv.messages[1].meta == {"level": "high"}
    assert conv.messages[3].status == h.INTERRUPTED  # left streaming by the old process
    assert [m.parent_id for m in conv.messages] == [None, 10, 11, 12]
    assert store.get_conversation("c2").messages == []
    # The old messages are searchable at once (indexed on open), titles too.
    assert [s.id for s in store.list_conversations("azulejos")] == ["c1"]
    assert [s.id for s in store.list_conversations("empty")] == ["c2"]
    # New messages continue the old path with fresh ids; the images stay tied to theirs.
    added = store.add_message("c1", "user", "Thanks")
    assert (added.position, added.parent_id) == (4, 13)
    assert added.id > 13
    store.close()
    # Opening again migrates nothing twice.
    again = h.History(path).open()
    assert len(again.get_conversation("c1").messages) == 5
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 1
    again.close()


def test_a_failed_migration_leaves_the_old_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    old_file(path)
    db = sqlite3.connect(path)  # an image pointing at no message: the check refuses it
    db.execute("INSERT INTO images VALUES (2, 999, 0, 'x.png', 'image/png', x'00')")
    db.commit()
    db.close()
    with pytest.raises(h.HistoryError, match="cannot be opened"):
        h.History(path).open()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    columns = {r[1] for r in db.execute("PRAGMA table_info(messages)")}
    assert "parent_id" not in columns
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 4


# ------------------------------------------------------------------------------------ search


def test_search_finds_words_inside_replies_titles_and_every_version(store: h.History) -> None:
    a = store.create_conversation("Bread")
    exchange(store, a, "How long to proof?", "Overnight, in the fridge: retarded fermentation.")
    b = store.create_conversation("Rust lifetimes")
    exchange(store, b, "What is 'a?", "A lifetime parameter.")
    assert [s.id for s in store.list_conversations("fermentation")] == [a]
    assert [s.id for s in store.list_conversations("ferment")] == [a]  # the last word: a prefix
    assert [s.id for s in store.list_conversations("rust")] == [b]
    assert store.list_conversations("fridge lifetime") == []  # every word must match
    (hit,) = store.search("fermentation")
    assert hit.conversation_id == a
    assert "<mark>fermentation</mark>" in hit.snippets[0]
    # An edited-away version stays searchable.
    store.truncate(b, 0)
    store.add_message(b, "user", "Explain borrowing")
    assert [s.id for s in store.list_conversations("parameter")] == [b]
    # Updates (a streaming reply) and deletes keep the index in step.
    reply = store.add_message(b, "assistant", "")
    store.update_message(reply.id, content="The borrow checker says no.")
    assert [s.id for s in store.list_conversations("checker")] == [b]
    store.update_message(reply.id, content="Changed.")
    assert store.list_conversations("checker") == []
    store.rename(a, "Sourdough")
    assert [s.id for s in store.list_conversations("sourdough")] == [a]
    assert store.list_conversations("bread") == []
    store.delete(a)
    assert store.list_conversations("fermentation") == []
    assert store.search("fermentation") == []


def test_snippets_escape_html_and_keep_only_the_marks(store: h.History) -> None:
    cid = store.create_conversation("XSS")
    exchange(store, cid, "hi", 'Run <script>alert("zebra")</script> & <b>zebra</b> now')
    (hit,) = store.search("zebra")
    snippet = hit.snippets[0]
    assert "<script>" not in snippet
    assert "&lt;script&gt;" in snippet
    assert "&lt;b&gt;" in snippet
    assert snippet.count("<mark>") == 2
    assert snippet.replace("<mark>", "").replace("</mark>", "").count("<") == 0


def test_search_syntax_in_the_query_is_taken_literally(store: h.History) -> None:
    cid = store.create_conversation('Quotes "and" NEAR stars*')
    assert [s.id for s in store.list_conversations('"and" NEAR(')] == [cid]
    assert [s.id for s in store.list_conversations("stars*")] == [cid]
    assert store.list_conversations("%") == []  # no words: titles matched literally
    assert store.search("  ") == []


# ---------------------------------------------------------------------------------- versions


def test_edit_and_regenerate_keep_the_earlier_versions(store: h.History) -> None:
    cid = store.create_conversation()
    exchange(store, cid, "q1", "a1")
    exchange(store, cid, "q2", "a2")
    # Regenerate the last reply: a second version beside the first.
    store.truncate(cid, 3)
    store.add_message(cid, "assistant", "a2 again")
    conv = store.get_conversation(cid)
    assert contents(store, cid) == ["q1", "a1", "q2", "a2 again"]
    assert (conv.messages[3].version, conv.messages[3].versions) == (2, 2)
    # Edit the first question: a new branch from the start.
    store.truncate(cid, 0)
    exchange(store, cid, "q1 edited", "a1'")
    assert contents(store, cid) == ["q1 edited", "a1'"]
    first = store.get_conversation(cid).messages[0]
    assert (first.version, first.versions) == (2, 2)
    # Page back: the old branch comes back as it was last shown (with "a2 again").
    assert store.switch_version(cid, 0, -1)
    assert contents(store, cid) == ["q1", "a1", "q2", "a2 again"]
    assert store.switch_version(cid, 3, -1)
    assert contents(store, cid) == ["q1", "a1", "q2", "a2"]
    assert not store.switch_version(cid, 3, -1)  # no version before the first
    assert store.switch_version(cid, 0, +1)
    assert contents(store, cid) == ["q1 edited", "a1'"]
    assert store.switch_version(cid, 0, -1)
    assert contents(store, cid) == ["q1", "a1", "q2", "a2"]  # remembers the choice below
    # Reopened from disk: the same path, every version still there.
    store.close()
    store.open()
    assert contents(store, cid) == ["q1", "a1", "q2", "a2"]
    assert store.get_conversation(cid).messages[0].versions == 2


def test_a_regenerate_that_stored_nothing_shows_the_old_reply_again(store: h.History) -> None:
    cid = store.create_conversation()
    exchange(store, cid, "q", "a")
    store.truncate(cid, 1)  # the engine then refused: no new reply
    assert contents(store, cid) == ["q"]
    assert store.restore_path(cid)
    assert contents(store, cid) == ["q", "a"]
    assert not store.restore_path(cid)


def test_delete_from_removes_a_message_and_what_follows(store: h.History) -> None:
    cid = store.create_conversation()
    exchange(store, cid, "q1", "a1")
    exchange(store, cid, "q2", "a2")
    store.delete_from(cid, 2)
    assert contents(store, cid) == ["q1", "a1"]
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 2
    assert store.list_conversations("a2") == []


# ------------------------------------------------------------------------------ export/import


def tree(store: h.History) -> str:
    cid = store.create_conversation("Branchy")
    store.set_settings(cid, None, {"preset": "Pirate", "temperature": 0.3})
    png = h.StoredImage("cat.png", "image/png", b"\x89PNG cat")
    store.add_message(cid, "user", "What is this?", images=[png])
    store.add_message(cid, "assistant", "A cat.", reasoning="whiskers", meta={"level": "high"})
    store.truncate(cid, 1)
    store.add_message(cid, "assistant", "A small cat.", status=h.STOPPED)
    store.truncate(cid, 0)
    store.add_message(cid, "user", "And this?")
    store.add_message(cid, "assistant", "A dog.")
    store.switch_version(cid, 0, -1)  # shown: the first question with "A small cat."
    return cid


def test_export_holds_every_version_and_import_gives_the_same_conversation(
    store: h.History, tmp_path: Path
) -> None:
    cid = tree(store)
    exported = json.loads(store.export_json(cid))
    (conv,) = exported["conversations"]
    assert exported["version"] == 2
    assert [m["content"] for m in conv["messages"]] == [
        "What is this?",
        "A cat.",
        "A small cat.",
        "And this?",
        "A dog.",
    ]
    assert [m["parent"] for m in conv["messages"]] == [None, 1, 1, None, 4]
    assert conv["current"] == 3
    assert conv["settings"] == {"preset": "Pirate", "temperature": 0.3}

    # Into another file: the id is free, so everything, the id included, is the same.
    other = h.History(tmp_path / "other.sqlite3").open()
    (new_id,) = other.import_json(store.export_json(cid))
    assert new_id == cid
    assert json.loads(other.export_json(new_id)) == exported
    assert [m.content for m in other.get_conversation(new_id).messages] == [
        "What is this?",
        "A small cat.",
    ]
    assert other.get_conversation(new_id).messages[0].images[0].data == b"\x89PNG cat"
    assert [s.id for s in other.list_conversations("dog")] == [new_id]  # indexed
    other.close()

    # Into the same file: a copy under a new id, equal in everything else.
    (copy_id,) = store.import_json(store.export_json(cid))
    assert copy_id != cid
    (copy,) = json.loads(store.export_json(copy_id))["conversations"]
    assert {**copy, "id": cid} == conv


def test_a_version_1_export_imports_as_one_path(store: h.History) -> None:
    v1 = {
        "format": "step-station-history",
        "version": 1,
        "conversations": [
            {
                "id": "old",
                "title": "Old export",
                "created_at": 1.0,
                "updated_at": 2.0,
                "messages": [
                    {
                        "role": "user",
                        "content": "hi",
                        "reasoning": "",
                        "status": "complete",
                        "meta": {},
                        "created_at": 1.0,
                        "images": [],
                    },
                    {
                        "role": "assistant",
                        "content": "hello",
                        "reasoning": "r",
                        "status": "complete",
                        "meta": {},
                        "created_at": 2.0,
                        "images": [],
                    },
                ],
            }
        ],
    }
    (cid,) = store.import_json(json.dumps(v1))
    assert contents(store, cid) == ["hi", "hello"]


@pytest.mark.parametrize(
    ("mangle", "says"),
    [
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (lambda text: "[]", '"format"'),
        (lambda text: text.replace('"version": 2', '"version": 9'), "version 9"),
        (lambda text: text.replace('"role": "assistant"', '"role": "robot"', 1), "role 'robot'"),
        (lambda text: text.replace('"parent": 1', '"parent": 7', 1), "parent 7"),
        (lambda text: text.replace('"current": 3', '"current": 42'), '"current" 42'),
        (lambda text: text.replace("base64,", "base64,!!", 1), "base64"),
        (lambda text: text.replace('"content": "A dog."', '"content": 5'), '"content"'),
    ],
)
def test_a_malformed_import_says_what_is_wrong_and_adds_nothing(
    store: h.History, mangle: object, says: str
) -> None:
    cid = tree(store)
    good = json.loads(store.export_json(cid))
    # Two conversations, the second one broken: the first must not be imported either.
    text = json.dumps(
        {
            **good,
            "conversations": [{**good["conversations"][0], "id": "x"}, good["conversations"][0]],
        },
        indent=2,
    )
    head, _, tail = text.partition('"id": "x"')
    broken = head + '"id": "x"' + mangle(tail)  # type: ignore[operator]
    if says in ("not valid JSON", '"format"', "version 9"):  # the file as a whole
        broken = mangle(text)  # type: ignore[operator]
    before = store.export_json()
    with pytest.raises(BadInputError, match="not a Step Station chat export") as err:
        store.import_json(broken)
    assert says in str(err.value)
    assert "Nothing was imported" in (err.value.hint or "")
    assert store.export_json() == before
