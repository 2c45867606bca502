"""The Sharing tab's client snippets, run as shown against a real gateway in front of the
simulator engine. Each test takes the text from `SharingController.snippets` (what the tab shows),
with the URL, served model name and context length the running service reports:

- curl and the openai SDK (chat and Responses) run as they are, through bash and python;
- Claude Code's variables run through bash with `claude` standing for the official anthropic SDK
  configured from them (what Claude Code speaks), and then with the real Claude Code CLI;
- Codex's config.toml is written as ~/.codex/config.toml and its shell lines run with the real
  Codex CLI (`codex exec`);
- Continue (an editor extension) and Open WebUI (a web app in Docker) cannot run here: their
  snippets are parsed (YAML; the `docker run` line through bash with `docker` printing its
  arguments) and the requests those clients make with the values found (the model list, a chat)
  are sent with the openai SDK.

The CLIs are installed from npm into a cache folder (about 10 s with npm's cache, a few minutes
cold); without npm or its registry they skip with the reason (also under CI: the public
registry is not something .ci/run can install).
A served model name full of quotes, shell expansions and HTML shows the quoting holds in each
language the snippets use.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import tomllib
import yaml
from gateway_kit import MODEL, GatewayStack, free_port, start_gateway

from appliance import settings as st
from appliance.controllers.client_snippets import CHECK_PROMPT, KEY_VAR
from appliance.controllers.sharing import SharingController
from appliance.gateway import FixedEngine
from appliance.gateway.sharing import Sharing

pytestmark = pytest.mark.timeout(600)

HOSTILE = 'st\'ep "3.7" $(touch pwned) `touch pwned2` <b>x</b>'
REPLY = "Simulated reply from "
# The CLI versions these tests were written against (npm), pinned so a release cannot change
# what the test proves without a commit saying so.
CLAUDE_CODE = ("@anthropic-ai/claude-code", "2.1.332", "claude")
CODEX = ("@openai/codex", "0.171.0", "codex")
CLI_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "step-station-tests"


@dataclass
class Station:
    """A keyed gateway in front of the simulator, and the Sharing tab's controller for it."""

    stack: GatewayStack
    controller: SharingController
    model: str

    def snippets(self, key: str) -> dict[str, str]:
        return self.controller.snippets("", key)  # "": the first address, as the tab picks

    def records(self, key_name: str, at_least: int = 0) -> list[tuple[str, int]]:
        """(path, status) of each request made with this key, oldest first, once there are
        `at_least` of them (or 10 s have passed): the gateway records a streamed request when it
        has sent the last bytes, which the client may have read a moment before."""
        deadline = time.monotonic() + 10
        while True:
            done = reversed(self.stack.gateway.recent(500))
            got = [(r.path, r.status) for r in done if r.key_name == key_name]
            if len(got) >= at_least or time.monotonic() > deadline:
                return got
            time.sleep(0.05)


def _station(simulator: Any, model: str) -> Iterator[Station]:
    url = str(simulator("--served-model-name", model, uds=True))
    settings = st.with_changes(
        st.Settings(), {"gateway.port": free_port(), "gateway.require_key_on_loopback": True}
    )
    stack = start_gateway(settings, FixedEngine(url, model), url)
    sharing = Sharing(st.SettingsStore(settings), stack.gateway, stack.keys)
    try:
        yield Station(stack, SharingController(sharing), model)
    finally:
        stack.gateway.stop()


@pytest.fixture
def station(simulator: Any) -> Iterator[Station]:
    """Served as the Station serves it (step3p7-flash)."""
    yield from _station(simulator, MODEL)


@pytest.fixture
def odd_station(simulator: Any) -> Iterator[Station]:
    """Served under a name made of quotes, shell expansions and HTML."""
    yield from _station(simulator, HOSTILE)


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{argv[:2]} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no key unless the test gives one, a home of its own."""
    home.mkdir(parents=True, exist_ok=True)
    keep = ("PATH", "LANG", "SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS")
    return {**{k: os.environ[k] for k in keep if k in os.environ}, "HOME": str(home), **extra}


def _context(station: Station) -> int:
    """The served model's context length as a client reads it from the gateway's model list
    (with a key of its own, so the client under test's records stay its own)."""
    entry = station.stack.client(station.stack.key("probe")).models.list().data[0]
    return int(entry.model_extra["max_model_len"])  # type: ignore[index]


# ------------------------------------------------------------------------ curl and openai SDK


@pytest.mark.parametrize("key_in_page", [True, False], ids=["key-in-page", "key-from-env"])
def test_curl_snippet_runs_as_shown(
    odd_station: Station, tmp_path: Path, key_in_page: bool
) -> None:
    key = odd_station.stack.key("curl")
    text = odd_station.snippets(key if key_in_page else "")["curl"]
    assert (key in text) is key_in_page
    env = _env(tmp_path / "home", **({} if key_in_page else {KEY_VAR: key}))
    out = _run(["bash", "-c", text], tmp_path, env)
    assert not list(tmp_path.glob("pwned*"))  # the model name stayed data
    chat, message = (json.loads(line) for line in out.strip().splitlines())
    assert chat["model"] == HOSTILE
    assert chat["choices"][0]["message"]["content"].startswith(f"{REPLY}{HOSTILE} to ")
    assert message["type"] == "message"
    assert message["model"] == HOSTILE
    texts = [block["text"] for block in message["content"] if block["type"] == "text"]
    assert texts[0].startswith(f"{REPLY}{HOSTILE} to ")
    # Bearer for the chat, x-api-key for the Messages API: both counted on the key.
    assert odd_station.records("curl", 2) == [("/v1/chat/completions", 200), ("/v1/messages", 200)]


@pytest.mark.parametrize("key_in_page", [True, False], ids=["key-in-page", "key-from-env"])
def test_openai_sdk_snippet_runs_as_shown(
    odd_station: Station, tmp_path: Path, key_in_page: bool
) -> None:
    key = odd_station.stack.key("python")
    text = odd_station.snippets(key if key_in_page else "")["Python (openai SDK)"]
    env = _env(tmp_path / "home", **({} if key_in_page else {KEY_VAR: key}))
    out = _run([sys.executable, "-c", text], tmp_path, env)
    streamed, responded = out.strip().splitlines()[:2]
    assert streamed.startswith(f"{REPLY}{HOSTILE} to ")  # the chat stream, printed as it came
    assert responded.startswith(f"{REPLY}{HOSTILE} to ")  # response.output_text
    assert odd_station.records("python", 2) == [
        ("/v1/chat/completions", 200),
        ("/v1/responses", 200),
    ]


# --------------------------------------------------------------------------------- Claude Code

# Stands in for `claude -p PROMPT`: the official anthropic SDK set up from the variables the
# snippet exports, as Claude Code reads them (base URL without /v1, the key as a Bearer token,
# the main model streamed, the "haiku" model for the small side requests).
_CLAUDE_STAND_IN = textwrap.dedent(
    """
    import os, sys
    import anthropic

    assert sys.argv[1] == "-p", sys.argv
    client = anthropic.Anthropic(max_retries=0, timeout=60)  # ANTHROPIC_BASE_URL, _AUTH_TOKEN
    assert client.auth_token == os.environ["ANTHROPIC_AUTH_TOKEN"] and not client.api_key
    with client.messages.stream(
        model=os.environ["ANTHROPIC_MODEL"],
        max_tokens=1024,
        messages=[{"role": "user", "content": sys.argv[2]}],
    ) as stream:
        print("".join(stream.text_stream))
    small = client.messages.create(
        model=os.environ["ANTHROPIC_DEFAULT_HAIKU_MODEL"],
        max_tokens=512,
        messages=[{"role": "user", "content": "A title for this chat."}],
    )
    print("".join(block.text for block in small.content if block.type == "text"))
    """
)


def test_claude_code_variables_through_the_anthropic_sdk(
    odd_station: Station, tmp_path: Path
) -> None:
    key = odd_station.stack.key("claude-code")
    text = odd_station.snippets(key)["Claude Code"]
    stand_in = tmp_path / "claude_stand_in.py"
    stand_in.write_text(_CLAUDE_STAND_IN)
    shim = f'claude() {{ {shlex.quote(sys.executable)} {shlex.quote(str(stand_in))} "$@"; }}\n'
    out = _run(["bash", "-c", shim + text], tmp_path, _env(tmp_path / "home"))
    assert not list(tmp_path.glob("pwned*"))
    streamed, small = out.strip().splitlines()[:2]
    assert streamed.startswith(f'{REPLY}{HOSTILE} to "{CHECK_PROMPT}"')
    assert small.startswith(f"{REPLY}{HOSTILE} to ")
    assert odd_station.records("claude-code", 2) == [("/v1/messages", 200)] * 2
    window = f"CLAUDE_CODE_AUTO_COMPACT_WINDOW={_context(odd_station)}"
    assert window in text  # the engine's own context length, as /v1/models says


# ------------------------------------------------------------------------------- real CLIs


def _unavailable(reason: str) -> None:
    # A skip even under CI: the CLIs come from the public npm registry (through this machine's
    # proxy), which .ci/run cannot install or start itself; the skip line says why.
    pytest.skip(f"coding-agent CLI unavailable: {reason}")


def _npm_cli(package: str, version: str, binary: str) -> Path:
    """The CLI's executable, installed once per version into a cache folder outside the repo."""
    prefix = CLI_CACHE / f"{package.replace('/', '+')}@{version}"
    exe = prefix / "node_modules" / ".bin" / binary
    if exe.exists():
        return exe
    npm = shutil.which("npm")
    if npm is None:
        _unavailable("npm is not installed (apt-get install nodejs npm)")
    prefix.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            [str(npm), "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
             f"{package}@{version}"],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        _unavailable(f"npm install {package}@{version} took over 300 s")
    if done.returncode != 0 or not exe.exists():
        _unavailable(f"npm install {package}@{version} failed: {done.stderr.strip()[-800:]}")
    return exe


@pytest.fixture(scope="session")
def claude_cli() -> Path:
    return _npm_cli(*CLAUDE_CODE)


@pytest.fixture(scope="session")
def codex_cli() -> Path:
    return _npm_cli(*CODEX)


def _project(tmp_path: Path) -> Path:
    """A git repository to run the agent in, as a user would (Codex wants one)."""
    project = tmp_path / "project"
    project.mkdir()
    subprocess.run(["git", "init", "-q", str(project)], check=True, timeout=30)
    return project


def test_claude_code_cli_runs_the_snippet(
    station: Station, claude_cli: Path, tmp_path: Path
) -> None:
    """The real Claude Code, with the snippet's variables, answers through the gateway.

    Run with `--tools ""` (a shell function wraps `claude`): the simulator answers any request
    that offers tools with a call to the first one, Claude Code's Agent tool, whose sub-agents
    are answered the same way without end; a real model answers "say hello" in words."""
    key = station.stack.key("claude-code")
    text = station.snippets(key)["Claude Code"]
    shim = 'claude() { command claude --tools "" "$@"; }\n'
    env = _env(tmp_path / "home")
    env["PATH"] = f"{claude_cli.parent}:{env['PATH']}"
    out = _run(["bash", "-c", shim + text], _project(tmp_path), env, timeout=180)
    assert f'{REPLY}{MODEL} to "' in out
    # The window line in the snippet took: no "assumes a context window of 1m tokens".
    assert "assumes a context window" not in out
    # Claude Code 2.1.332 in -p mode asks only POST /v1/messages (with ?beta=true, which the
    # gateway drops); /v1/messages/count_tokens, which the gateway keeps closed, is not asked.
    records = station.records("claude-code", 1)
    assert records
    assert set(records) == {("/v1/messages", 200)}


def test_codex_cli_runs_the_snippet(station: Station, codex_cli: Path, tmp_path: Path) -> None:
    """The real Codex with the snippet as ~/.codex/config.toml and its shell lines.

    The simulator answers the first request (which offers tools) with a call to Codex's shell
    tool; Codex runs it in its read-only sandbox (`words`: command not found) and sends the
    result back, and the simulator then answers in words: a tool round trip over the
    Responses API through the gateway."""
    key = station.stack.key("codex")
    text = station.snippets(key)["Codex"]
    config = tomllib.loads(text)
    assert config["model_context_window"] == _context(station)
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    (home / ".codex" / "config.toml").write_text(text)
    shell = [line.removeprefix("#   ") for line in text.splitlines() if line.startswith("#   ")]
    assert shell[0] == f"export {KEY_VAR}={key}"
    assert shell[1].startswith("codex exec ")
    env = _env(home)
    env["PATH"] = f"{codex_cli.parent}:{env['PATH']}"
    out = _run(["bash", "-c", "\n".join(shell)], _project(tmp_path), env, timeout=180)
    assert f'{REPLY}{MODEL} to "{CHECK_PROMPT}"' in out
    records = station.records("codex", 1)
    assert len(records) >= 2  # the tool call, then the answer
    assert set(records) == {("/v1/responses", 200)}


# ----------------------------------------------------------------- Continue and Open WebUI


def test_continue_config_parses_and_its_model_answers(odd_station: Station) -> None:
    """Continue is an editor extension and cannot run here: its config.yaml is parsed and the
    request its `openai` provider makes with those values (apiBase, apiKey, model and the
    requestOptions' extra body) is sent with the openai SDK."""
    key = odd_station.stack.key("continue")
    entry = yaml.safe_load(odd_station.snippets(key)["Continue"])["models"][0]
    assert entry["provider"] == "openai"
    assert entry["apiBase"] == odd_station.stack.base_url
    client = openai.OpenAI(base_url=entry["apiBase"], api_key=entry["apiKey"], max_retries=0)
    stream = client.chat.completions.create(
        model=entry["model"],
        messages=[{"role": "user", "content": CHECK_PROMPT}],
        extra_body=entry["requestOptions"]["extraBodyProperties"],
        stream=True,
    )
    reply = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert reply.startswith(f"{REPLY}{HOSTILE} to ")
    assert odd_station.records("continue", 1) == [("/v1/chat/completions", 200)]


def test_open_webui_settings_parse_and_its_connection_works(
    odd_station: Station, tmp_path: Path
) -> None:
    """Open WebUI runs in Docker and cannot run here: the snippet's `docker run` goes through
    bash with `docker` printing its arguments, then what Open WebUI does with such a
    connection (list the models with the key, then chat) is done with the values found."""
    key = odd_station.stack.key("open-webui")
    text = odd_station.snippets("")["Open WebUI"]
    shim = "docker() { printf '%s\\n' \"$@\"; }\n"
    args = _run(["bash", "-c", shim + text], tmp_path, _env(tmp_path / "home", **{KEY_VAR: key}))
    env = dict(arg.split("=", 1) for arg in args.splitlines() if arg.startswith("OPENAI_API_"))
    assert env == {"OPENAI_API_BASE_URL": odd_station.stack.base_url, "OPENAI_API_KEY": key}
    models = httpx.get(
        env["OPENAI_API_BASE_URL"] + "/models",
        headers={"Authorization": f"Bearer {env['OPENAI_API_KEY']}"},
        timeout=30,
    )
    assert [m["id"] for m in models.json()["data"]] == [HOSTILE]
    client = openai.OpenAI(
        base_url=env["OPENAI_API_BASE_URL"], api_key=env["OPENAI_API_KEY"], max_retries=0
    )
    reply = client.chat.completions.create(
        model=HOSTILE, messages=[{"role": "user", "content": CHECK_PROMPT}]
    )
    assert (reply.choices[0].message.content or "").startswith(f"{REPLY}{HOSTILE} to ")
    assert f"#   URL:  {odd_station.stack.base_url}" in text.splitlines()
