"""API keys: made once, stored hashed (0600), named, revocable, counted; the owner login."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest

from appliance import settings as st
from appliance.errors import BadInputError
from appliance.keys import KEY_PREFIX, KeyStore, KeyStoreError, OwnerLogin, hash_login, verify_login


def test_create_shows_the_key_once_and_stores_only_a_salted_hash() -> None:
    store = KeyStore()
    made = store.create("alice-laptop")
    assert made.secret.startswith(KEY_PREFIX)
    assert len(made.secret) >= len(KEY_PREFIX) + 8 + 32
    text = store.path.read_text()
    assert made.secret not in text
    assert made.secret[len(KEY_PREFIX) + 8 :] not in text
    record = json.loads(text)["keys"][0]
    assert record["name"] == "alice-laptop"
    assert len(record["salt"]) == 32
    assert len(record["digest"]) == 64
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    # The same secret under another key's salt would hash differently: salts are per key.
    other = store.create("bob")
    assert json.loads(store.path.read_text())["keys"][1]["salt"] != record["salt"]
    assert other.secret != made.secret


def test_verify_accepts_the_key_and_rejects_near_misses() -> None:
    store = KeyStore()
    made = store.create("ci")
    assert store.verify(made.secret) is not None
    assert store.verify(made.secret).name == "ci"  # type: ignore[union-attr]
    assert store.verify(made.secret[:-1] + ("A" if made.secret[-1] != "A" else "B")) is None
    assert store.verify(made.secret + "x") is None
    assert store.verify(made.secret.replace(KEY_PREFIX, "sk-")) is None
    assert store.verify("") is None
    assert store.verify(KEY_PREFIX) is None
    assert store.verify(f"{KEY_PREFIX}{made.record.id}") is None


def test_revoke_by_name_or_id_stops_the_key_and_frees_the_name() -> None:
    store = KeyStore()
    first = store.create("team")
    with pytest.raises(BadInputError, match="already exists"):
        store.create("team")
    store.revoke("team")
    assert store.verify(first.secret) is None
    second = store.create("team")
    store.revoke(second.record.id)
    assert store.verify(second.secret) is None
    with pytest.raises(BadInputError, match="No active key"):
        store.revoke("team")
    listed = store.list()
    assert [k.active for k in listed] == [False, False]


def test_bad_names_are_refused_with_a_reason() -> None:
    store = KeyStore()
    for bad in ("", "  ", "a" * 65, "x/y", "../etc", "name\nnewline"):
        with pytest.raises(BadInputError, match="not usable"):
            store.create(bad)
    assert store.list() == []


def test_usage_is_counted_per_key_and_survives_a_flush() -> None:
    store = KeyStore()
    a = store.create("a")
    b = store.create("b")
    store.record_usage(a.record.id, address="10.0.0.5", prompt_tokens=10, completion_tokens=90)
    store.record_usage(a.record.id, address="10.0.0.6", prompt_tokens=1, completion_tokens=2)
    store.record_usage(b.record.id, address="10.0.0.7", completion_tokens=5)
    listed = {k.name: k for k in store.list()}  # unflushed counts are visible too
    assert (listed["a"].requests, listed["a"].prompt_tokens, listed["a"].completion_tokens) == (
        2,
        11,
        92,
    )
    store.flush()
    fresh = {k.name: k for k in KeyStore().list()}
    assert fresh["a"].requests == 2
    assert fresh["a"].total_tokens == 103
    assert fresh["a"].last_address == "10.0.0.6"
    assert fresh["a"].last_used is not None
    assert fresh["b"].completion_tokens == 5
    assert fresh["b"].requests == 1


def test_a_running_store_sees_keys_made_and_revoked_by_another_process() -> None:
    running = KeyStore()
    running.record_usage("nobody", completion_tokens=1)  # pending counts for an unknown id
    code = "from appliance.keys import KeyStore; k = KeyStore().create('from-cli'); print(k.secret)"
    secret = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert running.verify(secret) is not None
    made_here = running.create("here")
    running.record_usage(made_here.record.id, completion_tokens=7)
    running.flush()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from appliance.keys import KeyStore; KeyStore().revoke('from-cli')",
        ],
        check=True,
    )
    assert running.verify(secret) is None
    names = {k.name: k for k in KeyStore().list()}
    assert names["here"].completion_tokens == 7
    assert not names["from-cli"].active


def test_a_damaged_file_refuses_every_key_with_a_clear_error() -> None:
    store = KeyStore()
    made = store.create("x")
    store.path.write_text("{not json")
    with pytest.raises(KeyStoreError, match="damaged"):
        store.verify(made.secret)
    with pytest.raises(KeyStoreError, match="keys create"):
        store.create("y")
    assert store.path.read_text() == "{not json"  # nothing overwritten


def test_owner_login_is_stored_hashed_and_checked() -> None:
    login = OwnerLogin()
    assert not login.is_set()
    assert not login.check("owner", "whatever1")
    with pytest.raises(BadInputError, match="8 characters"):
        login.set("owner", "short")
    login.set("owner", "correct horse")
    stored = st.load_secrets().ui_login_hash
    assert "correct horse" not in stored
    assert stored.startswith("scrypt$")
    assert stat.S_IMODE(st.secrets_path().stat().st_mode) == 0o600
    assert login.check("owner", "correct horse")
    assert not login.check("owner", "correct hors")
    assert not login.check("other", "correct horse")
    assert login.username() == "owner"
    assert not verify_login("garbage", "owner", "correct horse")
    assert hash_login("a", "12345678") != hash_login("a", "12345678")  # salted


def test_cli_create_list_revoke(capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.cli import main

    assert main(["keys", "create", "alice-laptop"]) == 0
    out, err = capsys.readouterr()
    secret = out.strip()
    assert secret.startswith(KEY_PREFIX)
    assert "shown only this once" in err
    assert KeyStore().verify(secret) is not None

    assert main(["keys", "list"]) == 0
    out, _ = capsys.readouterr()
    assert "alice-laptop" in out
    assert "active" in out
    assert secret not in out

    assert main(["keys", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["name"] == "alice-laptop"
    assert "digest" not in listed[0]
    assert "salt" not in listed[0]

    assert main(["keys", "create", "alice-laptop"]) == BadInputError.exit_code
    assert "already exists" in capsys.readouterr().err

    assert main(["keys", "revoke", listed[0]["id"]]) == 0
    assert KeyStore().verify(secret) is None
    assert main(["keys", "revoke", "alice-laptop"]) == BadInputError.exit_code
    assert "No active key" in capsys.readouterr().err
