"""The text the Sharing tab gives each client to paste: Claude Code, Codex, Continue, Open WebUI,
the openai SDK and curl, for one address, one key and the model the engine serves.

Pure functions of (base URL, key, model name), so the tab and the tests that run the snippets
(tests/integration/test_client_snippets_run.py) use the very same text. Every value is quoted for
the language it lands in (shell, TOML, YAML, Python, JSON): a served model name is data, never
code, whatever characters it holds.

The key: a key the page has just made is written in (the tab shows it once, in that page only);
otherwise the snippets read it from the environment variable `STEP_STATION_KEY` and say how to
set it, so no real key is ever printed into the page otherwise.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass

KEY_VAR = "STEP_STATION_KEY"
CHECK_PROMPT = "Say hello in five words."
_KEY_WHERE = "your key: shown once, when made"


@dataclass(frozen=True)
class Target:
    """Where a client connects: the gateway's OpenAI base URL (`.../v1`), a key or "", the
    served model name and its context length in tokens (0: not known now)."""

    base_url: str
    key: str
    model: str
    context: int = 0

    @property
    def root(self) -> str:
        """The URL without `/v1`: Anthropic clients add `/v1/messages` themselves."""
        return self.base_url.rstrip("/").removesuffix("/v1")


def _q(text: str) -> str:
    """A double-quoted string valid in TOML, YAML and Python alike (JSON's escapes)."""
    return json.dumps(text)


def _shell_key(target: Target) -> str:
    """The shell lines that put the key into $STEP_STATION_KEY."""
    if target.key:
        return f"export {KEY_VAR}={shlex.quote(target.key)}  # shown only now: keep it safe\n"
    return (
        "# Your key (shown once, when made; Create key above makes one):\n"
        f"#   export {KEY_VAR}=sk-step-...\n"
    )


def claude_code(target: Target) -> str:
    model = shlex.quote(target.model)
    return (
        "# Claude Code: run these in the shell you start `claude` from (or put the same values\n"
        '# in the "env" block of ~/.claude/settings.json). It adds /v1/messages to the URL.\n'
        f"{_shell_key(target)}"
        f"export ANTHROPIC_BASE_URL={shlex.quote(target.root)}\n"
        f'export ANTHROPIC_AUTH_TOKEN="${KEY_VAR}"\n'
        f"export ANTHROPIC_MODEL={model}\n"
        f"export ANTHROPIC_DEFAULT_OPUS_MODEL={model}\n"
        f"export ANTHROPIC_DEFAULT_SONNET_MODEL={model}\n"
        f"export ANTHROPIC_DEFAULT_HAIKU_MODEL={model}\n"
        f"export ANTHROPIC_SMALL_FAST_MODEL={model}  # the same, for Claude Code 1.x\n"
        f"{_claude_window(target)}"
        "export CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1  # no telemetry or update checks\n"
        f"claude -p {shlex.quote(CHECK_PROMPT)}  # a first check; then `claude` in your project\n"
    )


def codex(target: Target) -> str:
    key = target.key or f"sk-step-...  # {_KEY_WHERE}"
    return (
        "# Codex: ~/.codex/config.toml. Codex sends the Responses API to base_url + /responses\n"
        "# and reads the key from the variable env_key names. In your shell:\n"
        f"#   export {KEY_VAR}={key}\n"
        f"#   codex exec {shlex.quote(CHECK_PROMPT)}  # a first check; then: codex\n"
        f"model = {_q(target.model)}\n"
        'model_provider = "step-station"\n'
        f"{_codex_window(target)}"
        "\n"
        "[model_providers.step-station]\n"
        'name = "Step Station"\n'
        f"base_url = {_q(target.base_url)}\n"
        f'env_key = "{KEY_VAR}"\n'
        'wire_api = "responses"\n'
    )


def _claude_window(target: Target) -> str:
    if not target.context:
        return ""
    return (
        f"export CLAUDE_CODE_AUTO_COMPACT_WINDOW={target.context}"
        "  # the model's context: compact before it fills\n"
    )


def _codex_window(target: Target) -> str:
    if not target.context:
        return ""
    return f"model_context_window = {target.context}  # tokens, as the engine serves it\n"


def continue_dev(target: Target) -> str:
    if target.key:
        key, where = _q(target.key), ""
    else:
        key = "${{ secrets.%s }}" % KEY_VAR  # noqa: UP031 - the braces are Continue's
        where = f"# Put {KEY_VAR}=sk-step-... ({_KEY_WHERE}) into ~/.continue/.env\n"
    return (
        "# Continue: ~/.continue/config.yaml (or add the model to your models: list)\n"
        f"{where}"
        "name: Step Station\n"
        "version: 1.0.0\n"
        "schema: v1\n"
        "models:\n"
        f"  - name: {_q(target.model + ' (Step Station)')}\n"
        "    provider: openai\n"
        f"    model: {_q(target.model)}\n"
        f"    apiBase: {_q(target.base_url)}\n"
        f"    apiKey: {key}\n"
        "    roles: [chat, edit, apply]\n"
        "    requestOptions:\n"
        "      extraBodyProperties:\n"
        "        reasoning_effort: medium\n"
    )


def open_webui(target: Target) -> str:
    shown_key = target.key or f"sk-step-...  ({_KEY_WHERE})"
    return (
        "# Open WebUI: Admin Panel -> Settings -> Connections -> OpenAI API -> +\n"
        f"#   URL:  {target.base_url}\n"
        f"#   Key:  {shown_key}\n"
        f"#   (the model {_q(target.model)} then appears in the model list)\n"
        "# Or when starting Open WebUI with Docker:\n"
        f"{_shell_key(target)}"
        "docker run -d -p 3000:8080 \\\n"
        f"  -e OPENAI_API_BASE_URL={shlex.quote(target.base_url)} \\\n"
        f'  -e OPENAI_API_KEY="${KEY_VAR}" \\\n'
        "  -v open-webui:/app/backend/data --name open-webui ghcr.io/open-webui/open-webui:main\n"
    )


def python_sdk(target: Target) -> str:
    if target.key:
        head, key = "", _q(target.key)
    else:
        head, key = (
            "import os\n\n",
            f'os.environ["{KEY_VAR}"],  # export {KEY_VAR}=sk-step-... first',
        )
    return f"""{head}from openai import OpenAI

client = OpenAI(
    base_url={_q(target.base_url)},
    api_key={key}
)

# Chat Completions, streamed
stream = client.chat.completions.create(
    model={_q(target.model)},
    messages=[{{"role": "user", "content": {_q(CHECK_PROMPT)}}}],
    reasoning_effort="medium",  # low | medium | high
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()

# The Responses API (what Codex speaks)
response = client.responses.create(model={_q(target.model)}, input={_q(CHECK_PROMPT)})
print(response.output_text)
"""


def curl(target: Target) -> str:
    chat = json.dumps(
        {
            "model": target.model,
            "messages": [{"role": "user", "content": CHECK_PROMPT}],
            "reasoning_effort": "medium",
        }
    )
    messages = json.dumps(
        {
            "model": target.model,
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": CHECK_PROMPT}],
        }
    )
    return (
        f"{_shell_key(target)}"
        "\n"
        "# Chat Completions (OpenAI's API)\n"
        f"curl -sS -w '\\n' {shlex.quote(target.base_url + '/chat/completions')} \\\n"
        f'  -H "Authorization: Bearer ${KEY_VAR}" \\\n'
        '  -H "Content-Type: application/json" \\\n'
        f"  -d {shlex.quote(chat)}\n"
        "\n"
        "# Messages (Anthropic's API, what Claude Code speaks)\n"
        f"curl -sS -w '\\n' {shlex.quote(target.base_url + '/messages')} \\\n"
        f'  -H "x-api-key: ${KEY_VAR}" \\\n'
        '  -H "anthropic-version: 2023-06-01" \\\n'
        '  -H "Content-Type: application/json" \\\n'
        f"  -d {shlex.quote(messages)}\n"
    )


# Tab order: the coding agents first (what the tab is most often opened for), then the rest.
SNIPPETS: dict[str, Callable[[Target], str]] = {
    "Claude Code": claude_code,
    "Codex": codex,
    "Continue": continue_dev,
    "Open WebUI": open_webui,
    "Python (openai SDK)": python_sdk,
    "curl": curl,
}
# How the tab colours each (gr.Code has no TOML; YAML's colours read well enough for it).
LANGUAGES = {
    "Claude Code": "shell",
    "Codex": "yaml",
    "Continue": "yaml",
    "Open WebUI": "shell",
    "Python (openai SDK)": "python",
    "curl": "shell",
}


def client_snippets(base_url: str, key: str, model: str, context: int = 0) -> dict[str, str]:
    """Every client's snippet for this address, key ("" for none), served model name and its
    context length (0: left out)."""
    target = Target(base_url, key, model, context)
    return {name: make(target) for name, make in SNIPPETS.items()}
