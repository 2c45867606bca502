#!/opt/venv/bin/python
"""`vllm` in the real-vLLM test image: vLLM's own CLI, after one CPU-only workaround.

The appliance's Station profiles pass `--kv-cache-dtype fp8`. vLLM's CPU backend stores an FP8 KV
cache only on x86 with AVX-512 or AMX (vllm/v1/attention/backends/cpu_attn.py, `_get_attn_isa`:
"FP8 KV cache on CPU requires x86 with AVX-512 or AMX."); on a CPU without them (these AVX2 test
machines) the engine dies at KV-cache initialisation. Here, and only then, the flag's value becomes
`auto`, with a line in the log saying so. A GPU (the Station) keeps FP8. Test harness only: the
container's command stays exactly the argv the appliance builds.
"""

import sys


def _cpu_stores_fp8_kv() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return True
    return " avx512f" in flags or " amx_" in flags


def _adapt(args: list[str]) -> list[str]:
    if _cpu_stores_fp8_kv():
        return args
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--kv-cache-dtype" and i + 1 < len(out) and out[i + 1].startswith("fp8"):
            out[i + 1] = "auto"
        elif arg.startswith("--kv-cache-dtype=fp8"):
            out[i] = "--kv-cache-dtype=auto"
        else:
            continue
        sys.stderr.write(
            "step-station test image: this CPU has no AVX-512 or AMX, which vLLM's CPU backend "
            "needs for an FP8 KV cache: --kv-cache-dtype fp8 runs as auto\n"
        )
        sys.stderr.flush()
    return out


if __name__ == "__main__":
    sys.argv = [sys.argv[0].removesuffix(".exe"), *_adapt(sys.argv[1:])]
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
