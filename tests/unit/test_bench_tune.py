"""Tuned MoE configs: vLLM's file names and JSON format, the folder, and the engine setting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from appliance.bench import tune
from appliance.bench.errors import TunedConfigError
from appliance.bench.tune import MoeShape
from appliance.settings import data_dir

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "moe_configs"
B200 = "E=128,N=384,device_name=NVIDIA_B200,dtype=fp8_w8a8,block_shape=[128,128].json"
STEP37 = MoeShape(E=288, N=1280, dtype="fp8_w8a8", block_shape=(128, 128))
# Step-3.7-Flash's text_config numbers (transformers' configuration_step3p7 defaults, the
# checkpoint's legacy names).
TEXT_CONFIG = {"moe_num_experts": 288, "moe_top_k": 8, "moe_intermediate_size": 1280}


@pytest.mark.parametrize(
    ("shape", "gpu", "name"),
    [
        (
            STEP37,
            "NVIDIA GB300",
            "E=288,N=1280,device_name=NVIDIA_GB300,dtype=fp8_w8a8,block_shape=[128,128].json",
        ),
        (
            MoeShape(8, 14336),
            "NVIDIA H100 80GB HBM3",
            "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3.json",
        ),
        # Every H200 variant shares one file; `/` and runs of spaces become one `_`.
        (
            MoeShape(8, 7168, "fp8_w8a8"),
            "NVIDIA H200 NVL",
            "E=8,N=7168,device_name=NVIDIA_H200,dtype=fp8_w8a8.json",
        ),
        (
            MoeShape(64, 1024),
            "AMD Instinct MI300X / OAM",
            "E=64,N=1024,device_name=AMD_Instinct_MI300X_OAM.json",
        ),
        # A zero in the block shape drops the selector, as vLLM's all(block_shape) does.
        (
            MoeShape(8, 512, "fp8_w8a8", (0, 128)),
            "NVIDIA B200",
            "E=8,N=512,device_name=NVIDIA_B200,dtype=fp8_w8a8.json",
        ),
    ],
)
def test_file_name_is_vllms(shape: MoeShape, gpu: str, name: str) -> None:
    assert tune.config_file_name(shape, gpu) == name


def test_shipped_file_names_round_trip() -> None:
    for path in SHIPPED.glob("*.json"):
        parsed = tune.parse_config_file_name(path.name)
        assert parsed is not None, path.name
        shape, device = parsed
        assert tune.config_file_name(shape, device) == path.name


def test_names_vllm_never_looks_for_do_not_parse() -> None:
    assert tune.parse_config_file_name("E=8,N=7168.json") is None
    assert tune.parse_config_file_name("E=8,N=7,device_name=X,dtype=a,backend=flydsl.json") is None
    assert tune.parse_config_file_name("notes.json") is None


def test_step37_shape_from_its_text_config() -> None:
    assert tune.moe_shape(TEXT_CONFIG) == STEP37
    # transformers' native names work too.
    native = {"n_routed_experts": 288, "moe_intermediate_size": 1280}
    assert tune.moe_shape(native, dtype=None, block_shape=None) == MoeShape(288, 1280)
    # TP2 without expert parallel splits the intermediate size.
    assert tune.moe_shape(TEXT_CONFIG, tp_size=2).N == 640


def test_shape_needs_the_moe_numbers() -> None:
    # The dense intermediate_size must not be taken for the expert's (a silently wrong N).
    with pytest.raises(TunedConfigError, match="no MoE expert count"):
        tune.moe_shape({"num_local_experts": 288, "intermediate_size": 11264})
    with pytest.raises(TunedConfigError, match="dtype"):
        tune.moe_shape(TEXT_CONFIG, dtype="nvfp4")


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("*.json")), ids=lambda p: p.name[:40])
def test_every_shipped_config_is_valid(path: Path) -> None:
    configs = tune.load_config(path)
    assert configs
    assert all(isinstance(size, int) for size in configs)


def test_loaded_config_is_batch_size_to_kernel_parameters() -> None:
    configs = tune.load_config(SHIPPED / B200)
    assert 1 in configs
    assert set(tune.REQUIRED_KEYS) <= set(configs[1])
    raw = json.loads((SHIPPED / B200).read_text())
    assert configs[1] == raw["1"]


GOOD = {
    "triton_version": "3.5.0",
    "1": {
        "BLOCK_SIZE_M": 16,
        "BLOCK_SIZE_N": 128,
        "BLOCK_SIZE_K": 128,
        "GROUP_SIZE_M": 1,
        "num_warps": 4,
        "num_stages": 3,
    },
}


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ([], "not a JSON object"),
        ({"triton_version": "3.5.0"}, "no batch sizes"),
        (GOOD | {"bs64": GOOD["1"]}, "'bs64' is not a batch size"),
        (GOOD | {"2": "fast"}, "batch size 2: not an object"),
        (
            GOOD | {"2": {k: v for k, v in GOOD["1"].items() if k != "num_warps"}},
            "num_warps is None",
        ),
        (GOOD | {"2": GOOD["1"] | {"BLOCK_SIZE_N": 96}}, "BLOCK_SIZE_N is 96, not a power of two"),
        (GOOD | {"2": GOOD["1"] | {"num_stages": "3"}}, "num_stages is '3'"),
        (GOOD | {"2": GOOD["1"] | {"GROUP_SIZE_M": True}}, "GROUP_SIZE_M is True"),
        (GOOD | {"triton_version": 3}, "triton_version"),
        (GOOD | {"\u00b2": GOOD["1"]}, "is not a batch size"),  # a digit int() refuses
        (GOOD | {"0": GOOD["1"]}, "'0' is not a batch size"),
    ],
)
def test_format_problems_are_named(data: object, problem: str) -> None:
    problems = tune.check_config(data)
    assert any(problem in p for p in problems), problems


def test_good_config_has_no_problems() -> None:
    assert tune.check_config(GOOD) == []


def test_load_refuses_a_bad_file_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"1": {"BLOCK_SIZE_M": 16}')
    with pytest.raises(TunedConfigError, match="cannot be read") as err:
        tune.load_config(path)
    assert str(path) in str(err.value)
    path.write_text(json.dumps({"1": {"BLOCK_SIZE_M": 16}}))
    with pytest.raises(TunedConfigError, match="not in vLLM's format"):
        tune.load_config(path)


def test_folder_listing_checks_each_file(tmp_path: Path) -> None:
    shutil.copy(SHIPPED / B200, tmp_path / B200)
    (tmp_path / "notes.json").write_text("{}")
    bad = tune.config_file_name(STEP37, "NVIDIA GB300")
    (tmp_path / bad).write_text("{not json")
    files = {f.path.name: f for f in tune.read_folder(tmp_path)}
    assert set(files) == {B200, "notes.json", bad}
    assert files[B200].usable
    assert files[B200].device == "NVIDIA_B200"
    assert files[B200].shape == MoeShape(128, 384, "fp8_w8a8", (128, 128))
    assert files[B200].batch_sizes[0] == 1
    assert files[B200].triton_version == ""  # this shipped file has none; vLLM does not need it
    assert not files["notes.json"].usable
    assert not files[bad].usable
    assert any("unreadable" in p for p in files[bad].problems)


def test_missing_folder_has_no_configs(tmp_path: Path) -> None:
    assert tune.read_folder(tmp_path / "none") == []


def test_find_config_for_this_gpu_and_shape(tmp_path: Path) -> None:
    status = tune.find_config(tmp_path, STEP37, "NVIDIA GB300")
    assert not status.exists
    assert not status.usable
    assert (
        status.file_name
        == "E=288,N=1280,device_name=NVIDIA_GB300,dtype=fp8_w8a8,block_shape=[128,128].json"
    )
    (tmp_path / status.file_name).write_text(json.dumps(GOOD))
    status = tune.find_config(tmp_path, STEP37, "NVIDIA GB300")
    assert status.exists
    assert status.usable
    # Another GPU or dtype does not see it.
    assert not tune.find_config(tmp_path, STEP37, "NVIDIA B200").exists
    assert not tune.find_config(tmp_path, MoeShape(288, 1280), "NVIDIA GB300").exists


def test_default_folder_is_persistent_data() -> None:
    assert tune.default_folder() == data_dir() / "moe-configs"


def test_engine_gets_the_env_var_and_a_read_only_mount(tmp_path: Path) -> None:
    tuning = tune.engine_tuning(tmp_path)
    assert tuning.env == {"VLLM_TUNED_CONFIG_FOLDER": tune.CONTAINER_FOLDER}
    (mount,) = tuning.mounts
    assert (mount.host, mount.container, mount.read_only) == (tmp_path, tune.CONTAINER_FOLDER, True)


def test_host_engine_reads_the_folder_in_place(tmp_path: Path) -> None:
    tuning = tune.engine_tuning(tmp_path, in_container=False)
    assert tuning.env == {"VLLM_TUNED_CONFIG_FOLDER": str(tmp_path)}
    assert tuning.mounts == ()


STEP_TEXT = TEXT_CONFIG | {"hidden_size": 4096}


def test_tuner_model_config_carries_step37s_shape_in_a_branch_the_tuner_reads() -> None:
    config = tune.tuner_model_config(STEP_TEXT)
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (config["num_experts"], config["num_experts_per_tok"]) == (288, 8)
    assert (config["moe_intermediate_size"], config["hidden_size"]) == (1280, 4096)
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert "quantization_config" not in tune.tuner_model_config(STEP_TEXT, block_shape=None)


def test_tuner_model_config_needs_top_k_and_hidden_size() -> None:
    with pytest.raises(TunedConfigError, match="top-k or hidden size"):
        tune.tuner_model_config(TEXT_CONFIG)


def test_tuner_argv_always_sets_tp1_and_the_batch_sizes() -> None:
    argv = tune.tuner_argv(model_dir="/tmp/shape", save_dir="/out", batch_sizes=(1, 2, 4))
    assert argv == [
        "python3", "benchmarks/kernels/benchmark_moe.py",
        "--model", "/tmp/shape", "--tp-size", "1", "--dtype", "fp8_w8a8", "--tune",
        "--save-dir", "/out", "--batch-size", "1", "2", "4",
    ]  # fmt: skip
    assert tune.tuner_argv(model_dir="m", save_dir="o", dtype=None)[7] == "auto"
    default = tune.tuner_argv(model_dir="m", save_dir="o")
    assert default[default.index("--batch-size") + 1 :] == [
        str(b) for b in tune.DEFAULT_BATCH_SIZES
    ]
    with pytest.raises(TunedConfigError):
        tune.tuner_argv(model_dir="m", save_dir="o", batch_sizes=())


def test_merged_chunks_are_one_config_in_batch_size_order() -> None:
    entry = GOOD["1"]
    first = {"triton_version": "3.5.0", "64": entry, "1": entry}
    second = {
        "triton_version": "3.5.0",
        "8": entry | {"num_warps": 8},
        "1": entry | {"num_stages": 4},
    }
    merged = tune.merge_configs([first, second])
    assert list(merged) == ["triton_version", "1", "8", "64"]
    assert merged["1"]["num_stages"] == 4  # the later part wins
    assert tune.check_config(merged) == []


def test_merging_parts_of_different_triton_versions_is_refused() -> None:
    with pytest.raises(TunedConfigError, match="different Triton versions"):
        tune.merge_configs([GOOD, GOOD | {"triton_version": "3.6.0"}])


def test_merging_a_broken_part_is_refused() -> None:
    with pytest.raises(TunedConfigError, match="not in vLLM's format"):
        tune.merge_configs([GOOD, {"2": {"BLOCK_SIZE_M": 16}}])
