"""`step-station export kubernetes`: production-stack Helm values and a Deployment + Service,
validated against the chart's values.schema.json and the Kubernetes apps/v1 Deployment and v1
Service JSON schemas (vendored in tests/data, sources in tests/data/kubernetes-schema/SOURCE.md),
with the seed's command token for token and the key only ever by Secret reference."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from appliance import profiles
from appliance import settings as st
from appliance.cli import main
from appliance.commands import export

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
K8S = DATA / "kubernetes-schema"
SHARED_SEEDS = sorted((REPO.parent / "shared" / "seed").glob("*.txt"))
SEED = SHARED_SEEDS[0] if SHARED_SEEDS else DATA / "seed_model_card.txt"
IMAGE = "registry.example/vllm/vllm-openai:stepfun37"
DP_PROFILES = ("nvfp4-tp4-dp2", "fp8-tp1-dp4")


def _schema(name: str) -> dict[str, Any]:
    return json.loads((K8S / name).read_text(encoding="utf-8"))


def _validator(name: str) -> jsonschema.protocols.Validator:
    """A strict Kubernetes 1.37 schema; its `$ref`s resolve in the vendored _definitions.json."""
    definitions = _schema("_definitions.json")
    registry: Registry = Registry().with_resource(
        definitions["$id"], Resource.from_contents(definitions)
    )
    schema = _schema(name)
    return jsonschema.Draft202012Validator(schema, registry=registry)


DEPLOYMENT = _validator("deployment-apps-v1.json")
SERVICE = _validator("service-v1.json")
VALUES = jsonschema.Draft202012Validator(
    json.loads((DATA / "production-stack" / "values.schema.json").read_text(encoding="utf-8"))
)


def seed_serve(profile: profiles.Profile) -> list[str]:
    """The seed's `vllm serve` command for the profile's seed profile, parsed from the card."""
    base = profiles.get_profile(profile.seed_profile)
    lines = SEED.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("vllm serve "):
            continue
        joined = line
        while joined.rstrip().endswith("\\"):
            i += 1
            joined = joined.rstrip()[:-1] + " " + lines[i]
        argv = shlex.split(joined)
        if argv == profiles.seed_command(base):
            return argv
    if base.name == "nvfp4-tp1":  # the seed gives it as a sentence: the Station command's flags
        return profiles.seed_command(base)
    raise AssertionError(f"no seed command for {base.name}")


def _docs(profile: str, part: str = "all") -> list[dict[str, Any]]:
    text = export.render(profiles.get_profile(profile), image=IMAGE, part=part)
    return [d for d in yaml.safe_load_all(text) if d is not None]


ALL = [*profiles.PROFILES, *DP_PROFILES]


@pytest.mark.parametrize("name", ALL)
def test_every_profile_exports_documents_the_schemas_accept(name: str) -> None:
    values, deployment, service = _docs(name)
    VALUES.validate(values)
    DEPLOYMENT.validate(deployment)
    SERVICE.validate(service)
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["template"]["metadata"]["labels"] == selector
    assert service["spec"]["selector"] == selector


@pytest.mark.parametrize("name", ALL)
def test_the_manifest_runs_the_seeds_command_on_all_the_profiles_gpus(name: str) -> None:
    profile = profiles.get_profile(name)
    _, deployment, _ = _docs(name)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    seed = seed_serve(profile)
    # The image's entrypoint is `vllm serve`: args are the seed's after it, token for token,
    # then what the profile adds (e.g. --data-parallel-size), then where to listen.
    expected = [*seed[2:], *profile.extra_flags, "--host", "0.0.0.0", "--port", "8000"]
    assert container["args"] == expected
    assert container["image"] == IMAGE
    gpus = str(profile.tensor_parallel_size * profile.data_parallel_size)
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    if name in DP_PROFILES:
        assert container["args"][-6:-4] == [
            "--data-parallel-size",
            str(profile.data_parallel_size),
        ]


@pytest.mark.parametrize("name", ALL)
def test_the_helm_values_give_the_chart_the_same_command(name: str) -> None:
    """The chart runs `vllm serve modelURL --host --port`, its own flags (tensorParallelSize,
    enablePrefixCaching) then extraArgs (helm/templates/deployment-vllm-multi.yaml)."""
    profile = profiles.get_profile(name)
    (values,) = _docs(name, "values")
    (spec,) = values["servingEngineSpec"]["modelSpec"]
    seed = seed_serve(profile)
    assert spec["modelURL"] == seed[2]
    rest = [*seed[3:], *profile.extra_flags]
    at = rest.index("--tensor-parallel-size")
    assert spec["vllmConfig"]["tensorParallelSize"] == int(rest[at + 1])
    assert spec["vllmConfig"]["extraArgs"] == rest[:at] + rest[at + 2 :]
    assert spec["vllmConfig"]["enablePrefixCaching"] is True  # vLLM's default, kept
    assert spec["requestGPU"] == profile.tensor_parallel_size * profile.data_parallel_size
    assert (spec["repository"], spec["tag"]) == ("registry.example/vllm/vllm-openai", "stepfun37")


def test_the_schemas_are_strict_enough_to_catch_a_broken_document() -> None:
    _, deployment, service = _docs("fp8-tp8")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["argz"] = ["typo"]
    with pytest.raises(jsonschema.ValidationError):
        DEPLOYMENT.validate(broken)
    broken = copy.deepcopy(deployment)
    del broken["spec"]["selector"]
    with pytest.raises(jsonschema.ValidationError):
        DEPLOYMENT.validate(broken)
    broken = copy.deepcopy(service)
    broken["spec"]["ports"][0]["port"] = "eight thousand"
    with pytest.raises(jsonschema.ValidationError):
        SERVICE.validate(broken)
    (values,) = _docs("fp8-tp8", "values")
    values["routerSpec"]["routingLogic"] = "fastest"
    with pytest.raises(jsonschema.ValidationError):
        VALUES.validate(values)


def test_the_key_and_token_are_secret_references_never_values(
    station_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    token, key = "hf_export_must_not_leak_1234", "sk-export-must-not-leak-5678"
    st.save_secrets(st.Secrets(hf_token=token))
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("VLLM_API_KEY", key)
    assert main(["export", "kubernetes", "--profile", "fp8-tp8", "--secret", "my-llm"]) == 0
    out = capsys.readouterr().out
    assert token not in out
    assert key not in out
    values, deployment, _ = [d for d in yaml.safe_load_all(out) if d is not None]
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "value" not in env["VLLM_API_KEY"]
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "my-llm",
        "key": "vllm-api-key",
    }
    assert "value" not in env["HF_TOKEN"]
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "my-llm"
    engine = values["servingEngineSpec"]
    assert engine["vllmApiKey"] == {"secretName": "my-llm", "secretKey": "vllm-api-key"}
    assert engine["modelSpec"][0]["hf_token"] == {"secretName": "my-llm", "secretKey": "hf-token"}


def test_cli_parts_default_profile_and_bad_input(
    station_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", "kubernetes", "--part", "manifest"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d is not None]
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    assert docs[0]["metadata"]["name"] == "step-station-fp8-tp8"  # engine.profile auto: TP8
    assert main(["export", "kubernetes", "--part", "values", "--profile", "nvfp4-tp4"]) == 0
    (values,) = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d is not None]
    assert values["servingEngineSpec"]["modelSpec"][0]["name"] == "nvfp4-tp4"
    assert main(["export", "kubernetes", "--profile", "fp8-tp9"]) == 2
    assert "Unknown launch profile 'fp8-tp9'" in capsys.readouterr().err
    assert main(["export", "kubernetes", "--secret", "My_Secret"]) == 2
    assert "is not a Kubernetes name" in capsys.readouterr().err
