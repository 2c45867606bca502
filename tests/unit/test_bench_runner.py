"""BenchRunner: the argv it hands to `vllm bench serve`, the loopback bridge to the engine's socket,
progress, cancel, one run at a time, the key made for a run through the gateway, and the bench
container's spec.

The program run is a stand-in `vllm` and the engine a real HTTP server on a Unix socket
(tests/fixtures/bench_kit.py).
"""

from __future__ import annotations

import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from fixtures.bench_kit import (
    DEADLINE_S,
    REAL,
    Engine,
    engine_socket,
    fake_log,
    fake_vllm,
    wait_for,
)

from appliance import endpoint
from appliance import settings as st
from appliance.bench import presets, runner
from appliance.bench.errors import BenchError, BenchFailedError
from appliance.bench.runner import (
    BenchRequest,
    BenchRunner,
    BenchState,
    BenchTarget,
    TcpBridge,
)
from appliance.bench.store import BenchStore

__all__ = ["engine_socket", "fake_vllm"]  # fixtures, used by name


def target_for(engine_url: str, program: Path, **changes: Any) -> BenchTarget:
    base = BenchTarget(
        engine_url=engine_url,
        api_key=Engine.key,
        served_model_name="step3p7-flash",
        model="/models/tiny",
        context_len=4096,
        profile="fp8-tp1",
        runtime="process",
        program=str(program),
        image_digest="",
        vllm_version="0.32.0",
        gpu_name="NVIDIA GB300",
        flags={"mtp": True},
    )
    return BenchTarget(**{**base.__dict__, **changes})


# ------------------------------------------------------------------------------ a whole run


def test_a_run_over_the_engines_socket_is_kept_with_what_ran(
    engine_socket: str, fake_vllm: Path, tmp_path: Path
) -> None:
    seen: list[BenchState] = []
    bench = BenchRunner(BenchStore(tmp_path / "bench.sqlite3"))
    target = target_for(endpoint.socket_url(engine_socket), fake_vllm)
    request = BenchRequest(preset="seed", num_prompts=4, random_input=128, random_output=64)

    outcome = bench.run(request, target, seen.append)

    assert outcome.state == "completed"
    # every request crossed the bridge to the socket with the engine's key
    assert Engine.seen == [f"Bearer {Engine.key}"] * 4
    ran = fake_log(tmp_path)
    argv = ran["argv"][2:]
    base_url = argv[argv.index("--base-url") + 1]
    assert base_url.startswith("http://127.0.0.1:")
    # the argv is the presets' own, with the bridge's URL and the run's result folder
    expected = presets.bench_args(
        "seed",
        model="/models/tiny",
        served_model_name="step3p7-flash",
        base_url=base_url,
        tokenizer="/models/tiny",
        context_len=4096,
        num_prompts=4,
        random_input=128,
        random_output=64,
        result_dir=argv[argv.index("--result-dir") + 1],
        result_filename="result.json",
    )
    assert argv == expected
    assert ran["env"]["OPENAI_API_KEY"] == Engine.key
    assert ran["env"]["VLLM_USE_RUST_BENCH"] == "0"
    assert ran["env"]["HF_HUB_OFFLINE"] == "1"
    assert ran["env"]["VLLM_LEAK"] is None  # the caller's vLLM settings stay out
    # progress went from the tqdm frames to the callback
    assert [(s.done, s.total) for s in seen][-1] == (4, 4)
    assert seen[-1].preset == "seed"
    # kept: vLLM's own result plus what ran
    (stored,) = bench.list_runs()
    assert stored.id == outcome.id
    assert stored.info.profile == "fp8-tp1"
    assert stored.info.vllm_version == "0.32.0"
    assert stored.info.gpu_name == "NVIDIA GB300"
    assert stored.info.flags == {"mtp": True, "through_gateway": False}
    assert "--base-url" in stored.info.args
    assert base_url not in stored.info.args  # a dead loopback port says nothing later
    assert outcome.export()["id"] == stored.id
    assert outcome.export()["profile"] == "fp8-tp1"
    assert outcome.export()["completed"] == 4
    assert bench.current() is None


def test_the_bridge_is_gone_after_the_run(
    engine_socket: str, fake_vllm: Path, tmp_path: Path
) -> None:
    bench = BenchRunner(BenchStore(tmp_path / "bench.sqlite3"))
    bench.run(
        BenchRequest(num_prompts=1), target_for(endpoint.socket_url(engine_socket), fake_vllm)
    )
    argv = fake_log(tmp_path)["argv"]
    port = int(argv[argv.index("--base-url") + 1].rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_tcp_engine_is_used_directly(engine_socket: str, fake_vllm: Path, tmp_path: Path) -> None:
    bridge = TcpBridge(engine_socket)  # stands in for an engine on loopback TCP
    bridge.start()
    try:
        bench = BenchRunner(BenchStore(tmp_path / "bench.sqlite3"))
        bench.run(BenchRequest(num_prompts=2), target_for(bridge.url, fake_vllm))
    finally:
        bridge.close()
    argv = fake_log(tmp_path)["argv"]
    assert argv[argv.index("--base-url") + 1] == bridge.url


def test_failed_requests_raise_and_nothing_is_kept(
    engine_socket: str, fake_vllm: Path, tmp_path: Path
) -> None:
    bench = BenchRunner(BenchStore(tmp_path / "bench.sqlite3"))
    target = target_for(endpoint.socket_url(engine_socket), fake_vllm, api_key="sk-wrong")
    with pytest.raises(BenchFailedError, match="3 of 3 requests failed") as err:
        bench.run(BenchRequest(num_prompts=3), target)
    assert err.value.exit_code == BenchError.exit_code
    assert bench.list_runs() == []
    assert bench.current() is None


def test_a_program_that_cannot_run_says_what_to_install(tmp_path: Path) -> None:
    bench = BenchRunner(BenchStore(tmp_path / "bench.sqlite3"))
    target = target_for("http://127.0.0.1:9", tmp_path / "no-such-vllm")
    with pytest.raises(BenchError, match="vllm bench serve"):
        bench.run(BenchRequest(num_prompts=1), target)
    assert bench.current() is None


def test_bench_error_exit_code_is_its_own() -> None:
    """`status` exits 10 (not running) and 11 (in progress); every other error has its own."""
    from appliance.commands import engine as engine_cmd
    from appliance.errors import ApplianceError

    def subclasses(base: type[ApplianceError]) -> list[type[ApplianceError]]:
        found: list[type[ApplianceError]] = []
        for sub in base.__subclasses__():
            found += [sub, *subclasses(sub)]
        return found

    taken = {engine_cmd.EXIT_NOT_RUNNING, engine_cmd.EXIT_IN_PROGRESS, 130}
    others = {c.exit_code for c in subclasses(ApplianceError) if not issubclass(c, BenchError)}
    assert BenchError.exit_code not in taken | others | {ApplianceError.exit_code}


# -------------------------------------------------------------------------- cancel, one run


def test_cancel_stops_the_run_and_keeps_nothing(
    engine_socket: str, fake_vllm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DELAY", "0.5")
    bench = BenchRunner(BenchStore(tmp_path / "bench.sqlite3"))
    target = target_for(endpoint.socket_url(engine_socket), fake_vllm)
    outcomes: list[Any] = []
    thread = threading.Thread(
        target=lambda: outcomes.append(bench.run(BenchRequest(num_prompts=200), target))
    )
    thread.start()
    wait_for(lambda: (bench.current() or BenchState("", 0)).done >= 1, "the first request")
    # a second run while one runs: a clear error, and the first goes on
    with pytest.raises(BenchError, match="already running"):
        bench.run(BenchRequest(num_prompts=1), target)
    assert bench.cancel() is True
    thread.join(DEADLINE_S)
    assert not thread.is_alive()  # cancel ended it: the outcome below says cancelled, not completed
    (outcome,) = outcomes
    assert outcome.state == "cancelled"
    assert outcome.id is None
    assert bench.list_runs() == []
    assert bench.current() is None
    assert bench.cancel() is False  # nothing to cancel now
    assert len(Engine.seen) < 200


# ------------------------------------------------------------------------------ the gateway


class _Keys:
    """A key store that records what the runner made and revoked (subclasses nothing: the
    runner's seam is the KeyIssuer protocol, which KeyStore and ServiceKeys both satisfy)."""

    def __init__(self) -> None:
        from appliance.keys import KeyStore

        self.store = KeyStore()
        self.made: list[str] = []
        self.revoked: list[str] = []

    def create(self, name: str) -> Any:
        made = self.store.create(name)
        self.made.append(made.secret)
        return made

    def revoke(self, name_or_id: str) -> Any:
        self.revoked.append(name_or_id)
        return self.store.revoke(name_or_id)


def test_through_the_gateway_a_key_is_made_for_the_run_and_revoked(
    engine_socket: str, fake_vllm: Path, tmp_path: Path
) -> None:
    gateway = TcpBridge(engine_socket)  # stands in for the gateway's TCP port
    gateway.start()
    keys = _Keys()
    try:
        bench = BenchRunner(BenchStore(tmp_path / "bench.sqlite3"), keys=keys)
        target = target_for(endpoint.socket_url(engine_socket), fake_vllm, gateway_url=gateway.url)
        with pytest.raises(BenchFailedError):  # the stand-in wants the engine key, not this one
            bench.run(BenchRequest(num_prompts=2, through_gateway=True), target)
    finally:
        gateway.close()
    ran = fake_log(tmp_path)
    argv = ran["argv"]
    assert argv[argv.index("--base-url") + 1] == gateway.url
    (secret,) = keys.made
    assert ran["env"]["OPENAI_API_KEY"] == secret
    assert Engine.seen == [f"Bearer {secret}"] * 2
    (key,) = keys.store.list()
    assert key.name.startswith("bench-")
    assert not key.active  # revoked after the run, failed or not
    assert keys.store.verify(secret) is None


def test_through_the_gateway_without_a_service_says_so(fake_vllm: Path, tmp_path: Path) -> None:
    bench = BenchRunner(BenchStore(tmp_path / "bench.sqlite3"))
    with pytest.raises(BenchError, match="needs the running service"):
        bench.run(
            BenchRequest(num_prompts=1, through_gateway=True),
            target_for("http://127.0.0.1:9", fake_vllm),
        )


# ------------------------------------------------------------------------------ the bridge


def test_the_bridge_carries_large_answers_and_many_connections(engine_socket: str) -> None:
    import http.client

    with TcpBridge(engine_socket) as bridge:
        assert bridge.url.startswith("http://127.0.0.1:")
        results: list[int] = []

        def fetch() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", bridge.port, timeout=10)
            conn.request("GET", "/metrics")
            results.append(len(conn.getresponse().read()))
            conn.close()

        threads = [threading.Thread(target=fetch) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE_S)
        assert results == [300_000] * 8
        wait_for(lambda: bridge.connections() == 0, "the bridge to drop finished connections")
        listener = socket.getaddrinfo("127.0.0.1", bridge.port)[0]
        assert listener[4][0] == "127.0.0.1"


def test_the_bridge_closes_a_client_when_the_engine_is_gone(tmp_path: Path) -> None:
    with (
        TcpBridge(str(tmp_path / "gone.sock")) as bridge,
        socket.create_connection(("127.0.0.1", bridge.port), timeout=5) as conn,
    ):
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        try:
            answer = conn.recv(10)
        except ConnectionResetError:
            answer = b""
        assert answer == b""  # closed (or reset), never left hanging


# ----------------------------------------------------------------------- the bench container


def test_container_request_runs_vllm_from_the_engines_image(tmp_path: Path) -> None:
    target = BenchTarget(
        engine_url="http+unix://x",
        api_key="sk-engine",
        served_model_name="step3p7-flash",
        model="/data/models/step",
        context_len=65536,
        profile="fp8-tp1",
        runtime="docker",
        image="vllm/vllm-openai:stepfun37",
        image_digest="sha256:" + "a" * 64,
    )
    job = runner.BenchJob(
        args=("--backend", "vllm"),
        env=presets.bench_env("sk-engine"),
        work_dir=tmp_path,
        stamp="20261206-010203-1",
        api_key="sk-engine",
    )
    spec = runner.container_request(target, job)
    assert spec["image"] == "sha256:" + "a" * 64  # the engine's exact image
    assert spec["entrypoint"][:2] == ["/bin/sh", "-c"]
    assert spec["entrypoint"][2].endswith('exec vllm "$@"')
    assert spec["command"] == ["bench", "serve", "--backend", "vllm"]
    assert spec["network_mode"] == "host"
    assert spec["labels"] == {runner.LABEL_BENCH: "20261206-010203-1"}
    assert "OPENAI_API_KEY" not in spec["environment"]  # docker inspect shows the environment
    assert spec["volumes"]["/data/models/step"] == {
        "bind": runner.CONTAINER_TOKENIZER,
        "mode": "ro",
    }
    assert spec["volumes"][str(tmp_path / "key")]["mode"] == "ro"
    assert spec["volumes"][str(tmp_path / "result")]["bind"] == runner.CONTAINER_RESULT_DIR
    assert runner.tokenizer_for(target) == runner.CONTAINER_TOKENIZER
    # the engine names its own mount; the bench container mounts the host's folder again
    mounted = BenchTarget(**{**target.__dict__, "model": "/models/step", "model_dir": "/data/s"})
    spec = runner.container_request(mounted, job)
    assert spec["volumes"]["/data/s"] == {"bind": runner.CONTAINER_TOKENIZER, "mode": "ro"}
    assert "/models/step" not in spec["volumes"]
    hub = BenchTarget(**{**target.__dict__, "model": "stepfun-ai/Step-3.7-Flash",
                         "hf_cache": "/data/hf", "image_digest": ""})  # fmt: skip
    spec = runner.container_request(hub, job)
    assert spec["image"] == "vllm/vllm-openai:stepfun37"
    assert spec["volumes"]["/data/hf"] == {"bind": runner.CONTAINER_HF_CACHE, "mode": "ro"}
    assert runner.tokenizer_for(hub) == "stepfun-ai/Step-3.7-Flash"


class _FakeContainer:
    def __init__(self, frames: list[bytes], result_dir: Path) -> None:
        self.frames = frames
        self.result_dir = result_dir
        self.removed = False
        self.stopped = False

    def logs(self, **kwargs: Any) -> Any:
        if kwargs.get("stream"):
            return iter(self.frames)
        return b"Successful requests: 2\n"

    def wait(self, timeout: float) -> dict[str, int]:
        (self.result_dir / "result.json").write_text(REAL.read_text())
        return {"StatusCode": 0}

    def stop(self, timeout: int) -> None:
        self.stopped = True

    def remove(self, force: bool) -> None:
        self.removed = True


class _FakeClient:
    """docker-py's client where the runner touches it: containers.run / list."""

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []
        self.container: _FakeContainer | None = None
        self.containers = self
        self.leftover = _FakeContainer([], Path())  # a crashed appliance's bench container
        self.filters: list[dict[str, str]] = []

    def list(self, all: bool, filters: dict[str, str]) -> list[_FakeContainer]:  # noqa: A002
        self.filters.append(filters)
        return [] if self.leftover.removed else [self.leftover]

    def run(self, **kwargs: Any) -> _FakeContainer:
        self.runs.append(kwargs)
        result_dir = next(
            Path(src) for src, m in kwargs["volumes"].items() if m["bind"].endswith("result")
        )
        key_dir = next(
            Path(src) for src, m in kwargs["volumes"].items() if m["bind"].endswith("key")
        )
        assert (key_dir / "key").read_text() == "sk-engine-test\n"
        assert stat.S_IMODE((key_dir / "key").stat().st_mode) == 0o600
        frames = [b"\r 50%|# | 1/2 [00:01<00:01]", b"\r100%|##| 2/2 [00:02<00:00]"]
        self.container = _FakeContainer(frames, result_dir)
        return self.container


def test_the_docker_route_runs_a_labelled_container_and_removes_it(
    engine_socket: str, tmp_path: Path
) -> None:
    client = _FakeClient()
    bench = BenchRunner(
        BenchStore(tmp_path / "bench.sqlite3"),
        launcher_for=lambda t: runner.ContainerLauncher(t, client),
    )
    target = target_for(
        endpoint.socket_url(engine_socket),
        Path("unused"),
        runtime="docker",
        image="vllm/vllm-openai:stepfun37",
    )
    outcome = bench.run(BenchRequest(num_prompts=2), target)
    assert outcome.state == "completed"
    (spec,) = client.runs
    assert spec["command"][spec["command"].index("--result-dir") + 1] == runner.CONTAINER_RESULT_DIR
    assert spec["command"][spec["command"].index("--tokenizer") + 1] == runner.CONTAINER_TOKENIZER
    assert client.container is not None
    assert client.container.removed
    assert client.leftover.removed  # found by its label before the run
    assert client.filters == [{"label": runner.LABEL_BENCH}]
    (result_dir,) = [src for src, m in spec["volumes"].items() if m["bind"].endswith("result")]
    assert Path(result_dir).is_relative_to(st.data_dir())  # shared with the host in compose
