"""Will this engine take the appliance's command line, and will the model honour reasoning_effort?

Flags: vLLM drops flags between releases, and an engine given a flag it does not know exits 2 at
once with `vllm: error: unrecognized arguments: X` (the top-level parser reports it; vLLM's
`FlexibleArgumentParser`, vllm/utils/argparse_utils.py). So before a start the appliance asks
the engine itself, once per image digest (Docker) or per `vllm` program and version (process
runtime), for `vllm serve --help=all`, keeps the long and short options it lists in a small
cache file, and checks every flag of the command line it built against them:

- a flag the engine knows: kept;
- a flag it does not know that is a known no-op (`profiles.NOOP_FLAGS`): dropped, with a note;
- any other: the start is refused with a message naming the flag and the engine.

When the engine cannot print its help (an old image, a broken install), the start goes on with
the flags as built and a note says the check could not run.

Chat template: vLLM passes a request's `reasoning_effort` to the chat template only when the
template references the variable; otherwise it silently drops it (`resolve_chat_template_kwargs`
keeps only the template's undeclared variables, found with `jinja2.meta.
find_undeclared_variables`: vllm/renderers/hf.py in 0.32, vllm/entrypoints/chat_utils.py in
earlier releases). After the weights are on disk, `template_notes` warns when the model's template
(`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`) never names it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from appliance import profiles
from appliance import settings as st
from appliance.engine.spec import LaunchSpec
from appliance.errors import EngineError

log = logging.getLogger(__name__)

HELP_TIMEOUT_S = 300.0  # importing vLLM (torch, CUDA libraries) can take a minute on a cold disk
CACHE_FORMAT = 1
EFFORT_VAR = "reasoning_effort"

# An option line of argparse's help: indented a little (help text is indented 24 columns), then
# the option strings, each maybe followed by its metavar, separated by ", ".
_OPTION_LINE = re.compile(r"^ {1,8}(-[^\s].*)$")
_OPTION = re.compile(r"^--?[A-Za-z][A-Za-z0-9_.-]*$")
_EFFORT = re.compile(r"\breasoning_effort\b")


_IMAGE_HINT = (
    "Use an engine image made for this appliance (`step-station config set engine.image IMAGE`),"
    " or another profile (`step-station plan` lists them)."
)
_PROGRAM_HINT = (
    "Install the vLLM version this appliance is made for (`pip install 'step-station[native]'`),"
    " use the Docker runtime (`step-station config set engine.runtime docker`), or pick another"
    " profile (`step-station plan` lists them)."
)


class FlagCheckUnavailable(Exception):
    """The engine could not say which flags it knows (the check is skipped, with a note)."""


@runtime_checkable
class ImageHelp(Protocol):
    """What a container runtime offers the flag check (DockerRuntime implements it)."""

    def image_digest(self, ref: str) -> str:
        """The local image's content id (`sha256:...`); EngineError when it is not here."""

    def serve_help(self, ref: str, timeout_s: float) -> tuple[int, str]:
        """(exit code, output) of `vllm serve --help=all` in a throwaway container of `ref`."""


@dataclass(frozen=True)
class FlagCheck:
    """The command line to run and what the user should know about it."""

    args: tuple[str, ...]
    notes: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()


# ------------------------------------------------------------------------------ pure parts


def parse_help(text: str) -> frozenset[str]:
    """Every option string (`--max-model-len`, `-tp`, `--no-enable-prefix-caching`) that
    argparse's help output lists."""
    found: set[str] = set()
    for line in text.splitlines():
        match = _OPTION_LINE.match(line.rstrip())
        if match is None:
            continue
        invocation = re.split(r"\s{2,}", match.group(1))[0]
        for part in invocation.split(", "):
            token = part.split(" ", 1)[0]
            if _OPTION.match(token):
                found.add(token)
    return frozenset(found)


def flag_name(token: str) -> str | None:
    """The option a command-line token names, the way vLLM's parser reads it: `--a_b=1` is
    `--a-b`, `--compilation-config.mode 3` is `--compilation-config`; None for values."""
    if not token.startswith("-") or token == "-" or token == "--" or token[1:2].isdigit():
        return None
    if token.startswith("-") and not token.startswith("--"):
        return token.split("=", 1)[0]
    key = token.split("=", 1)[0]
    key = key.split(".", 1)[0]
    return "--" + key[2:].replace("_", "-")


def decide_flags(
    args: Sequence[str],
    known: frozenset[str],
    engine: str,
    noops: Mapping[str, str] | None = None,
) -> FlagCheck:
    """Keep the flags `known` lists, drop unknown no-ops (with a note), refuse any other.

    `engine` names the engine in messages ("the image vllm/vllm-openai:stepfun37").
    """
    noops = profiles.NOOP_FLAGS if noops is None else noops
    kept: list[str] = []
    dropped: list[str] = []
    notes: list[str] = []
    unknown: list[str] = []
    for token in args:
        name = flag_name(token)
        short = name is not None and not name.startswith("--") and name[:2] in known  # -O3
        if name is None or name in known or short:
            kept.append(token)
            continue
        if name in noops:  # no-op flags take no value: dropping the token is the whole flag
            dropped.append(token)
            notes.append(
                f"Dropped {name}: {engine} does not know it, and it changes nothing there "
                f"({noops[name]})."
            )
            continue
        unknown.append(name)
        kept.append(token)
    if unknown:
        names = ", ".join(dict.fromkeys(unknown))
        one = len(unknown) == 1
        raise EngineError(
            f"{engine[0].upper()}{engine[1:]} does not know the flag{'' if one else 's'} {names} "
            'that this profile passes; vLLM would exit at once with "unrecognized arguments".',
            hint=_PROGRAM_HINT if engine.startswith("the program") else _IMAGE_HINT,
        )
    return FlagCheck(tuple(kept), tuple(notes), tuple(dropped))


def unavailable_note(engine: str, reason: str) -> str:
    return (
        f"Could not check which flags {engine} accepts ({reason}); starting with the flags as "
        "built."
    )


# ----------------------------------------------------------------------------------- cache


def cache_folder() -> Path:
    return st.cache_dir() / "engine-flags"


def _cache_file(folder: Path, key: str) -> Path:
    return folder / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def load_cached(folder: Path, key: str) -> frozenset[str] | None:
    """The options cached for `key`; None when absent or unreadable (then it is asked again)."""
    try:
        data = json.loads(_cache_file(folder, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("key") != key:
        return None
    options = data.get("options")
    if not isinstance(options, list) or not options:
        return None
    return frozenset(str(o) for o in options)


def save_cached(folder: Path, key: str, options: frozenset[str], engine: str) -> None:
    """Store the options; a cache that cannot be written (full disk, read-only or dangling
    folder) only costs the next start another `--help=all`, so it never fails a start."""
    path = _cache_file(folder, key)
    payload = {
        "format": CACHE_FORMAT,
        "key": key,
        "engine": engine,
        "checked_at": time.time(),
        "options": sorted(options),
    }
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        os.replace(tmp, path)  # readers never see half a file
    except OSError as err:
        log.warning("could not cache the engine's flags in %s: %s", folder, err)


# --------------------------------------------------------------------- asking the engine


def _options_from(code: int, text: str) -> frozenset[str]:
    options = parse_help(text)
    if code != 0 or "--port" not in options:  # every `vllm serve` has --port
        last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "")
        raise FlagCheckUnavailable(
            f"`vllm serve --help=all` exited {code}" + (f": {last[-200:]}" if last else "")
        )
    return options


def program_key(executable: Sequence[str]) -> str:
    """The process runtime's cache key: the program's resolved path and vLLM's version (the
    version from the dist-info beside it; the program's size and time when there is none)."""
    program = Path(shutil.which(executable[0]) or executable[0])
    with_version = program.resolve() if program.exists() else program
    version = _installed_vllm_version(program)
    if not version:
        try:
            stat = program.stat()
            version = f"mtime={stat.st_mtime_ns},size={stat.st_size}"
        except OSError:
            version = "unknown"
    return f"process:{with_version}:{' '.join(executable[1:])}:{version}"


def _installed_vllm_version(program: Path) -> str:
    """vLLM's version from `<venv>/lib/python*/site-packages/vllm*.dist-info/METADATA`."""
    venv = program.parent.parent
    for meta in sorted(venv.glob("lib/python*/site-packages/vllm*.dist-info/METADATA")):
        try:
            for line in meta.read_text(encoding="utf-8", errors="replace").splitlines()[:20]:
                if line.startswith("Version:"):
                    return f"{meta.parent.name.split('-', 1)[0]}=={line.split(':', 1)[1].strip()}"
        except OSError:
            continue
    return ""


def process_help(
    executable: Sequence[str], env: Mapping[str, str], timeout_s: float
) -> tuple[int, str]:
    """(exit code, stdout) of `<executable> --help=all`."""
    argv = [*executable, "--help=all"]
    try:
        done = subprocess.run(  # noqa: S603 - the launch spec's own program
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env={**os.environ, **env, "COLUMNS": "200"},
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise FlagCheckUnavailable(f"`vllm serve --help=all` ran past {timeout_s:.0f} s") from err
    except OSError as err:
        raise FlagCheckUnavailable(f"could not run {argv[0]!r}: {err.strerror}") from err
    out = done.stdout.decode("utf-8", "replace")
    if done.returncode != 0:
        out += "\n" + done.stderr.decode("utf-8", "replace")
    return done.returncode, out


def engine_name(spec: LaunchSpec) -> str:
    """The engine in the user's words, for messages."""
    if spec.executable:
        return f"the program {spec.executable[0]}"
    return f"the image {spec.image}"


def check_flags(
    spec: LaunchSpec,
    runtime: object,
    *,
    cache_dir: Path | None = None,
    timeout_s: float = HELP_TIMEOUT_S,
) -> FlagCheck:
    """The spec's arguments checked against what its engine knows (cached); EngineError naming
    the flag when one is unknown and not a known no-op."""
    folder = cache_dir or cache_folder()
    engine = engine_name(spec)
    try:
        if spec.executable:
            key = program_key(spec.executable)
            known = load_cached(folder, key)
            if known is None:
                code, text = process_help(spec.executable, spec.env_map, timeout_s)
                known = _options_from(code, text)
                save_cached(folder, key, known, engine)
        elif isinstance(runtime, ImageHelp):
            key = "image:" + runtime.image_digest(spec.image)
            known = load_cached(folder, key)
            if known is None:
                known = _options_from(*runtime.serve_help(spec.image, timeout_s))
                save_cached(folder, key, known, engine)
        else:
            return FlagCheck(spec.args)
    except FlagCheckUnavailable as err:
        return FlagCheck(spec.args, (unavailable_note(engine, str(err)),))
    return decide_flags(spec.args, known, engine)


# --------------------------------------------------------------------------- chat template


def template_uses_effort(template: str) -> bool:
    """True when the Jinja template names `reasoning_effort` (vLLM keeps the kwarg then)."""
    return bool(_EFFORT.search(template))


def model_templates(folder: Path) -> list[tuple[str, str]]:
    """(where, template text) of the chat template vLLM would use from a model folder:
    `chat_template.jinja` (transformers prefers it), else tokenizer_config.json's
    `chat_template`: a string, or a list of named templates of which "default" is used."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return [(jinja.name, jinja.read_text(encoding="utf-8", errors="replace"))]
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, str):
        return [("tokenizer_config.json", template)]
    if isinstance(template, list):
        named = {
            str(t.get("name")): str(t.get("template", ""))
            for t in template
            if isinstance(t, dict) and t.get("template")
        }
        if "default" in named:
            return [("tokenizer_config.json (default)", named["default"])]
        return [(f"tokenizer_config.json ({name})", text) for name, text in named.items()][:1]
    return []


def model_folder(spec: LaunchSpec) -> Path | None:
    """Where the model's files are on this machine: a local checkpoint, or the HF cache's
    snapshot of the repo (the one `refs/main` names, else the newest)."""
    model = spec.model
    for mount in spec.mounts:  # Docker: the host folder mounted at the container path
        if mount.target == model:
            return Path(mount.source)
    if model.startswith(("/", "./", "~")):
        path = Path(model).expanduser()
        return path if path.is_dir() else None
    if not spec.hf_cache or "/" not in model:
        return None
    repo = Path(spec.hf_cache) / "hub" / ("models--" + model.replace("/", "--"))
    try:
        ref = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        ref = ""
    snapshot = repo / "snapshots" / ref if ref else None
    if snapshot is not None and snapshot.is_dir():
        return snapshot
    snapshots = sorted(
        (p for p in (repo / "snapshots").glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime
    )
    return snapshots[-1] if snapshots else None


def template_notes(spec: LaunchSpec) -> list[str]:
    """A warning when the model's chat template does not use `reasoning_effort`."""
    if spec.arg_value("--chat-template"):
        return []  # the operator chose a template; vLLM uses that one
    folder = model_folder(spec)
    if folder is None:
        return []
    templates = model_templates(folder)
    if not templates:
        return []
    where, text = templates[0]
    if template_uses_effort(text):
        return []
    return [
        f"The model's chat template ({where}) does not use {EFFORT_VAR}: vLLM drops the "
        "reasoning level of every request without a word, so Low / Medium / High all think the "
        "same. Use a checkpoint whose template reads reasoning_effort."
    ]
