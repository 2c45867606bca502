"""Child process for tests/gpu/test_sampler_gpu.py: allocates known amounts of GPU memory.

Reads one command per line on stdin and answers one JSON line on stdout:
  init           create the CUDA context
  alloc BYTES    allocate (and touch) a tensor of BYTES bytes
  free           drop every tensor and return the memory to the driver
  exit           leave
Each answer: {"pid", "reserved_bytes" (torch's cudaMalloc'd total), "cuda_free_bytes",
"cuda_total_bytes"}. Runs on the GPU named by CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def report() -> None:
    free, total = torch.cuda.mem_get_info()
    answer = {
        "pid": os.getpid(),
        "reserved_bytes": torch.cuda.memory_reserved(),
        "cuda_free_bytes": free,
        "cuda_total_bytes": total,
    }
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


def main() -> None:
    tensors: list[torch.Tensor] = []
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "init":
            torch.cuda.init()
            torch.zeros(1, device="cuda")
            torch.cuda.synchronize()
        elif command == "alloc":
            tensors.append(torch.ones(int(arg), dtype=torch.uint8, device="cuda"))
            torch.cuda.synchronize()
        elif command == "free":
            tensors.clear()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        elif command == "exit":
            return
        report()


if __name__ == "__main__":
    main()
