"""`step-station export kubernetes [--profile P] [--part values|manifest|all]`: beyond a fleet.

Writes YAML documents to stdout for a cluster (docs/scale-out.md):

- a values file for vLLM production-stack's Helm chart (vllm-project/production-stack,
  helm/values.schema.json; the chart runs `vllm serve MODEL --host 0.0.0.0 --port P`, then the
  flags of `vllmConfig`, then `vllmConfig.extraArgs`);
- a plain manifest: a Deployment (the engine image, whose entrypoint is `vllm serve`, with the
  profile's exact arguments, `nvidia.com/gpu` requests) and a ClusterIP Service.

Either way the profile's command is the seed's token for token (`profiles.seed_command`), then
what the profile adds (`extra_flags`, e.g. `--data-parallel-size`). The API key and the Hugging
Face token come from a Kubernetes Secret by reference (`secretKeyRef`), never inline: nothing
from this machine's secrets is read. tests/unit/test_export_kubernetes.py validates the output
against the chart's values schema and the Kubernetes apps/v1 Deployment and v1 Service schemas.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import yaml

from appliance import profiles
from appliance import settings as st
from appliance.errors import SettingsError
from appliance.profiles import Profile

PORT = 8000
SECRET = "step-station-engine"  # the Secret the user creates (kubectl create secret ...)
KEY_FIELD = "vllm-api-key"
HF_TOKEN_FIELD = "hf-token"
APP = "step-station"
HF_HOME = "/root/.cache/huggingface"
GIB = 2**30
PARTS = ("all", "values", "manifest")


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "export",
        help="write a deployment of a launch profile for another platform (kubernetes)",
        description="Write YAML documents to stdout: a values file for vLLM production-stack's "
        "Helm chart and a plain Deployment + Service manifest, with the profile's exact "
        "`vllm serve` arguments and the API key from a Kubernetes Secret.",
    )
    parser.add_argument("target", choices=["kubernetes"], help="the platform (kubernetes)")
    parser.add_argument(
        "--profile",
        metavar="P",
        help="launch profile (default: engine.profile; with 'auto', fp8-tp8). "
        f"One of {', '.join(profiles.PROFILES)}, or NAME-dpN for N data-parallel replicas",
    )
    parser.add_argument(
        "--part",
        choices=PARTS,
        default="all",
        help="values: only the Helm values; manifest: only the Deployment and Service "
        "(default: all, the values first)",
    )
    parser.add_argument("--image", help="engine image (default: engine.image)")
    parser.add_argument(
        "--secret",
        default=SECRET,
        help=f"name of the Secret holding '{KEY_FIELD}' and '{HF_TOKEN_FIELD}' "
        "(default %(default)s)",
    )
    parser.set_defaults(func=_run)


DEFAULT_CLUSTER_PROFILE = "fp8-tp8"  # the seed's datacenter command


def _run(args: argparse.Namespace) -> int:
    engine = st.load_settings().settings.engine
    name = args.profile or engine.profile
    if name in ("", "auto"):
        name = DEFAULT_CLUSTER_PROFILE
    profile = profiles.get_profile(name)
    image = args.image or engine.image
    _check_name(args.secret, "--secret")
    sys.stdout.write(render(profile, image=image, secret=args.secret, part=args.part))
    return 0


def _check_name(value: str, what: str) -> None:
    ok = value and len(value) <= 63 and value[0].isalnum() and value[-1].isalnum()
    if not ok or any(not (c.islower() or c.isdigit() or c == "-") for c in value):
        raise SettingsError(
            f"{what} {value!r} is not a Kubernetes name.",
            hint="Use lower-case letters, digits and '-', starting and ending with a letter or "
            "digit, at most 63 characters.",
        )


# ------------------------------------------------------------------------------ the documents


def serve_args(profile: Profile) -> list[str]:
    """The profile's `vllm serve` arguments after `vllm serve`: the seed's, then the profile's."""
    return [*profiles.seed_command(profile)[2:], *profile.extra_flags]


def _split_image(image: str) -> tuple[str, str]:
    last = image.rsplit("/", 1)[-1]
    if "@" in image:
        repo, digest = image.split("@", 1)
        return repo, f"@{digest}"
    if ":" in last:
        repo, tag = image.rsplit(":", 1)
        return repo, tag
    return image, "latest"


def _sizes(profile: Profile) -> dict[str, Any]:
    """Requests for one engine: every GPU of the profile; host memory and CPUs as a starting
    point (vLLM's workers, tokenizer and the weights' page cache); storage for the checkpoint."""
    gpus = profile.gpu_count
    weights_gib = profile.weights_gb * 1e9 / GIB
    return {
        "gpus": gpus,
        "cpu": max(8, 4 * gpus),
        "memory": f"{max(64, 32 * gpus)}Gi",
        "storage": f"{math.ceil(weights_gib * 1.2 / 50) * 50}Gi",
        "shm": f"{max(16, 8 * gpus)}Gi",
    }


def helm_values(profile: Profile, *, image: str, secret: str = SECRET) -> dict[str, Any]:
    """production-stack's values: one modelSpec for the profile, the key and HF token from
    `secret`. The chart emits `--tensor-parallel-size` from `vllmConfig.tensorParallelSize`
    (and mounts /dev/shm only then), so that flag pair leaves extraArgs for it."""
    args = serve_args(profile)
    model, rest = args[0], args[1:]
    at = rest.index("--tensor-parallel-size")
    tp = int(rest[at + 1])
    extra = rest[:at] + rest[at + 2 :]
    repo, tag = _split_image(image)
    size = _sizes(profile)
    spec: dict[str, Any] = {
        "name": profile.name,
        "repository": repo,
        "tag": tag,
        "modelURL": model,
        "replicaCount": 1,
        "requestCPU": size["cpu"],
        "requestMemory": size["memory"],
        "requestGPU": size["gpus"],
        "pvcStorage": size["storage"],
        "shmSize": size["shm"],
        "hf_token": {"secretName": secret, "secretKey": HF_TOKEN_FIELD},
        "vllmConfig": {
            "tensorParallelSize": tp,
            "enablePrefixCaching": True,  # vLLM's default; the chart passes one or the other
            "extraArgs": extra,
        },
    }
    return {
        "servingEngineSpec": {
            "runtimeClassName": "nvidia",
            "vllmApiKey": {"secretName": secret, "secretKey": KEY_FIELD},
            "modelSpec": [spec],
        },
        # Prompts that share a prefix (an agent's system prompt and tools) go to the engine that
        # holds it in its prefix cache.
        "routerSpec": {"routingLogic": "prefixaware"},
    }


def _labels(profile: Profile) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/instance": profile.name}


def deployment(profile: Profile, *, image: str, secret: str = SECRET) -> dict[str, Any]:
    """apps/v1 Deployment: the engine image (entrypoint `vllm serve`) with the profile's args."""
    size = _sizes(profile)
    labels = _labels(profile)
    gpu = {"nvidia.com/gpu": str(size["gpus"])}
    container = {
        "name": "vllm",
        "image": image,
        "args": [*serve_args(profile), "--host", "0.0.0.0", "--port", str(PORT)],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": [
            {
                "name": "VLLM_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": secret, "key": KEY_FIELD}},
            },
            {
                "name": "HF_TOKEN",
                "valueFrom": {
                    "secretKeyRef": {"name": secret, "key": HF_TOKEN_FIELD, "optional": True}
                },
            },
            {"name": "HF_HOME", "value": HF_HOME},
        ],
        "resources": {
            "requests": {"cpu": str(size["cpu"]), "memory": size["memory"], **gpu},
            "limits": gpu,
        },
        # Loading hundreds of GB of weights takes a while: the startup probe allows an hour.
        "startupProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 360,
        },
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 15,
            "failureThreshold": 4,
        },
        "volumeMounts": [
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "hf-cache", "mountPath": HF_HOME},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"{APP}-{profile.name}", "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            # One engine holds all of a node's GPUs: the old one goes before the new one starts.
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [container],
                    "volumes": [
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": size["shm"]}},
                        # Replace with a PersistentVolumeClaim to keep the weights across restarts.
                        {"name": "hf-cache", "emptyDir": {"sizeLimit": size["storage"]}},
                    ],
                },
            },
        },
    }


def service(profile: Profile) -> dict[str, Any]:
    """v1 Service: the engine inside the cluster only (ClusterIP); an Ingress or the router
    goes in front."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{APP}-{profile.name}", "labels": _labels(profile)},
        "spec": {
            "type": "ClusterIP",
            "selector": _labels(profile),
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


class _PlainDumper(yaml.SafeDumper):
    """Writes a repeated mapping (the labels) out in full: no `&id001` anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _document(comment: str, data: dict[str, Any]) -> str:
    head = "".join(f"# {line}\n" if line else "#\n" for line in comment.splitlines())
    body = yaml.dump(data, Dumper=_PlainDumper, sort_keys=False, width=1000)
    return "---\n" + head + body


def render(profile: Profile, *, image: str, secret: str = SECRET, part: str = "all") -> str:
    """The YAML stream for `part` (values, manifest or all)."""
    if part not in PARTS:
        raise SettingsError(f"Unknown part {part!r}.", hint=f"Choose one of: {', '.join(PARTS)}.")
    secret_line = (
        f"The Secret {secret!r} is not part of this output; create it first:\n"
        f"  kubectl create secret generic {secret} --from-literal={KEY_FIELD}=$VLLM_API_KEY \\\n"
        f"    --from-literal={HF_TOKEN_FIELD}=$HF_TOKEN"
    )
    summary = f"{profile.name}: {profile.summary} ({profile.gpu_count} GPU(s))"
    out = []
    if part in ("all", "values"):
        out.append(
            _document(
                f"Step Station export, {summary}.\n"
                "Values for vLLM production-stack's Helm chart "
                "(https://github.com/vllm-project/production-stack):\n"
                "  step-station export kubernetes --part values > values.yaml\n"
                "  helm install step vllm/vllm-stack -f values.yaml\n" + secret_line,
                helm_values(profile, image=image, secret=secret),
            )
        )
    if part in ("all", "manifest"):
        out.append(
            _document(
                f"Step Station export, {summary}.\n"
                "Plain manifest: step-station export kubernetes --part manifest | "
                "kubectl apply -f -\n" + secret_line,
                deployment(profile, image=image, secret=secret),
            )
        )
        out.append(_document(f"Service for {profile.name}", service(profile)))
    return "".join(out)
