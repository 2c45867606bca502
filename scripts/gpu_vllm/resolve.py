"""Resolve and download vLLM's wheel set for the GPU device machine, leaving out what it has.

Run here (not on the device machine), by `scripts/gpu_vllm.sh prepare`:

    python scripts/gpu_vllm/resolve.py DEST REQ... [-NAME...]

pip resolves the whole set for CPython 3.12 manylinux x86-64 (`pip install --dry-run --report`),
with the device image's torch, torchvision, torchaudio, triton and CUDA libraries stood in for by
empty stub wheels (version `+device`, so pip takes them over PyPI's), which keeps their huge and
pinned CUDA requirements out of the resolution. Every distribution the device image already
holds (its list: /work/.library/device/KINDS.md, "Python packages already there") is then left
out, as is each `-NAME` given; the rest is downloaded with `pip download --no-deps` at the
resolved versions. Writes DEST/resolution.json (each wheel with its version, size and sha256,
and what was left out).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

# The device image's packages (KINDS.md, read 2026-11-17), used there as they are.
DEVICE_HAS = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax
e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"""
DEVICE = {canonicalize_name(n) for n in DEVICE_HAS.split()}
# Stand-ins for the device's own builds (KINDS.md: torch 2.11.0+cu130, torchvision 0.26.0,
# torchaudio 2.11.0, triton 3.6.0); vLLM 0.23.0 pins exactly these.
STUBS = {"torch": "2.11.0", "torchvision": "0.26.0", "torchaudio": "2.11.0", "triton": "3.6.0"}

PLATFORMS = [
    # The device is Ubuntu 24.04 (glibc 2.39).
    *(f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]
TARGET = [
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    *(a for p in PLATFORMS for a in ("--platform", p)),
]


def stub_wheel(folder: Path, name: str, version: str) -> None:
    dist = f"{name}-{version}+device"
    info = f"{dist}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}+device\n",
        f"{info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    files[f"{info}/RECORD"] = "".join(f"{p},,\n" for p in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    dest = Path(sys.argv[1])
    reqs = [a for a in sys.argv[2:] if not a.startswith("-")]
    leave_out = {canonicalize_name(a[1:]) for a in sys.argv[2:] if a.startswith("-")}
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--isolated"]
    with tempfile.TemporaryDirectory() as tmp:
        stubs = Path(tmp) / "stubs"
        stubs.mkdir()
        for name, version in STUBS.items():
            stub_wheel(stubs, name, version)
        report = Path(tmp) / "report.json"
        subprocess.run(
            [
                *pip,
                "install",
                "--dry-run",
                "--ignore-installed",
                "--report",
                str(report),
                "--target",
                str(Path(tmp) / "t"),
                "--find-links",
                str(stubs),
                *TARGET,
                *reqs,
            ],
            check=True,
        )
        resolved = json.loads(report.read_text())["install"]
    pins: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for item in resolved:
        meta = item["metadata"]
        name = canonicalize_name(meta["name"])
        if name in DEVICE or name in leave_out or name in STUBS:
            skipped[name] = meta["version"]
        else:
            pins[name] = meta["version"]
    subprocess.run(
        [
            *pip,
            "download",
            "--no-deps",
            *TARGET,
            "--platform",
            "any",
            "-d",
            str(dest),
            *(f"{n}=={v}" for n, v in sorted(pins.items())),
        ],
        check=True,
    )
    wheels: dict[str, dict[str, object]] = {}
    for whl in sorted(dest.glob("*.whl")):
        name, version, *_ = parse_wheel_filename(whl.name)
        if pins.get(canonicalize_name(name)) == str(version):
            wheels[canonicalize_name(name)] = {
                "wheel": whl.name,
                "version": str(version),
                "size": whl.stat().st_size,
                "sha256": sha256(whl),
            }
    missing = sorted(set(pins) - set(wheels))
    if missing:
        raise SystemExit(f"resolve: no wheel downloaded for {missing}")
    (dest / "resolution.json").write_text(
        json.dumps(
            {"requested": reqs, "wheels": wheels, "left_out": skipped}, indent=1, sort_keys=True
        )
        + "\n"
    )
    total = sum(int(str(e["size"])) for e in wheels.values())
    print(f"resolve: {len(wheels)} wheels, {total / 2**20:.1f} MiB; left out {len(skipped)}")  # noqa: T201


if __name__ == "__main__":
    main()
