"""The clients' snippets as text: each parses in its own language and carries the URL, the model
and the key as data, whatever characters the served model name holds (a name is data, never
code). Running them against a real gateway is the job of
tests/integration/test_client_snippets_run.py."""

from __future__ import annotations

import ast
import json
import os
import subprocess

import pytest
import tomllib
import yaml

from appliance.controllers.client_snippets import KEY_VAR, SNIPPETS, client_snippets

URL = "http://192.168.1.20:8000/v1"
KEY = "sk-step-0123abcdAbC_dEf-0123456789abcdefghijKLMN"
# Quotes of every kind, shell expansions, YAML/TOML specials and HTML in one served name.
HOSTILE = "st'ep\"3 $(touch pwned) `id` ${HOME} #x: [y] {z} <img src=x onerror=alert(1)> \\n"
NAMES = [HOSTILE, "step3p7-flash"]


def _bash(script: str, env: dict[str, str]) -> str:
    """Run a shell snippet with bash, its commands replaced by functions that print their
    arguments and environment, so the test sees exactly what the real command would get."""
    stubs = (
        'claude() { printf "claude[%s]\\n" "$@"; env | grep -E "^(ANTHROPIC|CLAUDE)_" | sort; }\n'
        'curl() { printf "curl[%s]\\n" "$@"; }\n'
        'docker() { printf "docker[%s]\\n" "$@"; }\n'
    )
    done = subprocess.run(
        ["bash", "-euc", stubs + script],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={"PATH": os.environ["PATH"], **env},
    )
    return done.stdout


@pytest.mark.parametrize("model", NAMES)
def test_claude_code_sets_the_variables_claude_reads(model: str, tmp_path) -> None:
    text = client_snippets(URL, KEY, model, 262144)["Claude Code"]
    out = _bash(text, {"HOME": str(tmp_path)})
    assert not (tmp_path / "pwned").exists()
    env = dict(
        line.split("=", 1) for line in out.splitlines() if line.startswith(("ANTHROPIC", "CLAUDE"))
    )
    assert env["ANTHROPIC_BASE_URL"] == "http://192.168.1.20:8000"  # no /v1: claude adds it
    assert env["ANTHROPIC_AUTH_TOKEN"] == KEY
    for name in ("MODEL", "DEFAULT_OPUS_MODEL", "DEFAULT_SONNET_MODEL", "DEFAULT_HAIKU_MODEL"):
        assert env[f"ANTHROPIC_{name}"] == model
    assert env["ANTHROPIC_SMALL_FAST_MODEL"] == env["ANTHROPIC_MODEL"]
    assert env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == "262144"
    assert "claude[-p]\nclaude[Say hello in five words.]" in out


def test_without_a_key_the_shell_snippets_read_it_from_the_environment(tmp_path) -> None:
    snippets = client_snippets(URL, "", "step3p7-flash")
    assert all("sk-step-0" not in text for text in snippets.values())
    out = _bash(snippets["Claude Code"], {"HOME": str(tmp_path), KEY_VAR: KEY})
    assert f"ANTHROPIC_AUTH_TOKEN={KEY}" in out
    out = _bash(snippets["curl"], {KEY_VAR: KEY})
    assert f"curl[Authorization: Bearer {KEY}]" in out
    assert f"curl[x-api-key: {KEY}]" in out
    out = _bash(snippets["Open WebUI"], {KEY_VAR: KEY})
    assert f"docker[OPENAI_API_KEY={KEY}]" in out
    assert "CLAUDE_CODE_AUTO_COMPACT_WINDOW" not in snippets["Claude Code"]  # unknown: left out


@pytest.mark.parametrize("model", NAMES)
def test_curl_sends_the_model_inside_valid_json(model: str, tmp_path) -> None:
    out = _bash(client_snippets(URL, KEY, model)["curl"], {"HOME": str(tmp_path)})
    assert not (tmp_path / "pwned").exists()
    lines = out.splitlines()
    bodies = [json.loads(lines[i + 1][5:-1]) for i, line in enumerate(lines) if line == "curl[-d]"]
    assert [b["model"] for b in bodies] == [model, model]
    assert f"curl[{URL}/chat/completions]" in lines
    assert f"curl[{URL}/messages]" in lines
    assert bodies[1]["max_tokens"] > 0  # the Messages API requires it


@pytest.mark.parametrize("model", NAMES)
def test_codex_config_is_toml_with_a_responses_provider(model: str) -> None:
    text = client_snippets(URL, KEY, model, 131072)["Codex"]
    config = tomllib.loads(text)
    assert config["model"] == model
    provider = config["model_providers"][config["model_provider"]]
    assert provider["base_url"] == URL  # Codex adds /responses
    assert provider["wire_api"] == "responses"
    assert provider["env_key"] == KEY_VAR
    assert config["model_context_window"] == 131072
    assert f"#   export {KEY_VAR}={KEY}" in text.splitlines()


@pytest.mark.parametrize(("model", "key"), [(HOSTILE, KEY), ("step3p7-flash", "")])
def test_continue_config_is_yaml_with_an_openai_model(model: str, key: str) -> None:
    config = yaml.safe_load(client_snippets(URL, key, model)["Continue"])
    entry = config["models"][0]
    assert (entry["provider"], entry["model"], entry["apiBase"]) == ("openai", model, URL)
    assert entry["apiKey"] == (key or "${{ secrets.%s }}" % KEY_VAR)  # noqa: UP031


@pytest.mark.parametrize(("model", "key"), [(HOSTILE, KEY), ("step3p7-flash", "")])
def test_python_snippet_passes_the_values_as_literals(model: str, key: str) -> None:
    tree = ast.parse(client_snippets(URL, key, model)["Python (openai SDK)"])
    calls = {
        node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id: node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name)
    }
    client = {k.arg: k.value for k in calls["OpenAI"].keywords}
    assert ast.literal_eval(client["base_url"]) == URL
    if key:
        assert ast.literal_eval(client["api_key"]) == key
    else:
        assert ast.unparse(client["api_key"]) == f"os.environ['{KEY_VAR}']"
    for name in ("create",):  # chat.completions.create and responses.create
        assert name in calls
    models = [
        ast.literal_eval(k.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for k in node.keywords
        if k.arg == "model"
    ]
    assert models == [model, model]


def test_every_snippet_names_the_url() -> None:
    snippets = client_snippets(URL, "", "step3p7-flash")
    assert list(snippets) == list(SNIPPETS)
    assert all("192.168.1.20:8000" in text for text in snippets.values())
