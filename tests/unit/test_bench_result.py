"""Reading `vllm bench serve`'s result file: the numbers, success from the counts, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appliance.bench.errors import BenchFailedError, BenchResultError
from appliance.bench.result import load_result, parse_result

DATA = Path(__file__).resolve().parents[1] / "data" / "bench"
REAL = DATA / "result-0.32-spec-decode.json"


def real() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(REAL.read_text())
    return data


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    return path


def test_real_result_file_parses_with_its_numbers() -> None:
    result = load_result(REAL)
    assert result.completed == 8
    assert result.failed == 0
    assert result.succeeded
    assert result.request_throughput == pytest.approx(136.73233744199072)
    assert result.output_throughput == pytest.approx(2187.7173990718516)
    assert result.ttft is not None
    assert result.ttft.mean == pytest.approx(7.650151250118142)
    assert result.ttft.median == pytest.approx(9.039811500315409)
    assert result.ttft.p99 == pytest.approx(11.110762460502883)
    assert result.tpot is not None
    assert result.tpot.p99 == pytest.approx(1.624720037318184)
    assert result.itl is not None
    assert result.itl.median == pytest.approx(1.217278000240185)
    assert result.raw["model_id"] == "/work/main/.realvllm/models/tiny-std"
    assert result.require_success() is result


def test_spec_decode_keys_become_mtp_acceptance() -> None:
    spec = load_result(REAL).spec_decode
    assert spec is not None
    assert spec.acceptance_rate == pytest.approx(66.66666666666666)
    assert spec.acceptance_length == pytest.approx(3.0)
    assert (spec.num_drafts, spec.draft_tokens, spec.accepted_tokens) == (128, 384, 256)
    assert len(spec.per_position) == 2


def test_without_spec_decode_keys_there_is_no_acceptance() -> None:
    data = {k: v for k, v in real().items() if not k.startswith("spec_decode")}
    assert parse_result(data).spec_decode is None


def test_all_requests_failed_is_not_success_even_though_vllm_exits_zero() -> None:
    data = real() | {"completed": 0, "failed": 8}
    result = parse_result(data)
    assert not result.succeeded
    with pytest.raises(BenchFailedError, match="all 8 requests failed"):
        result.require_success()


def test_some_failed_requests_are_not_success() -> None:
    result = parse_result(real() | {"completed": 6, "failed": 2})
    with pytest.raises(BenchFailedError, match="2 of 8 requests failed"):
        result.require_success()


def test_a_run_with_nothing_completed_may_lack_latencies() -> None:
    data = {k: v for k, v in real().items() if not k.endswith("_ms")}
    result = parse_result(data | {"completed": 0, "failed": 3})
    assert result.ttft is None
    assert not result.succeeded


def test_a_completed_run_without_latencies_is_malformed() -> None:
    data = {k: v for k, v in real().items() if k != "p99_tpot_ms"}
    with pytest.raises(BenchResultError, match="'p99_tpot_ms'"):
        parse_result(data)


def test_nan_metrics_load_as_floats(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(
        REAL.read_text().replace('"std_ttft_ms": 3.4286556456854402', '"std_ttft_ms": NaN')
    )
    assert load_result(path).raw["std_ttft_ms"] != load_result(path).raw["std_ttft_ms"]


def test_missing_file_says_the_run_did_not_finish(tmp_path: Path) -> None:
    with pytest.raises(BenchResultError, match="stopped or crashed before it finished") as err:
        load_result(tmp_path / "none.json")
    assert str(tmp_path / "none.json") in str(err.value)


def test_truncated_file_is_a_clear_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(REAL.read_text()[:200])
    with pytest.raises(BenchResultError, match="not valid JSON") as err:
        load_result(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("data", [[1, 2], "text", None])
def test_non_object_is_refused(tmp_path: Path, data: object) -> None:
    with pytest.raises(BenchResultError, match="not a JSON object"):
        load_result(write(tmp_path, data))


@pytest.mark.parametrize(
    ("key", "value"), [("completed", "8"), ("completed", True), ("failed", 1.5), ("failed", -1)]
)
def test_counts_must_be_counts(key: str, value: object) -> None:
    with pytest.raises(BenchResultError, match=repr(key)):
        parse_result(real() | {key: value})


def test_missing_throughput_is_named() -> None:
    data = {k: v for k, v in real().items() if k != "output_throughput"}
    with pytest.raises(BenchResultError, match="'output_throughput'"):
        parse_result(data)


def test_bad_per_position_list_is_refused() -> None:
    with pytest.raises(BenchResultError, match="per_position"):
        parse_result(real() | {"spec_decode_per_position_acceptance_rates": "high"})
