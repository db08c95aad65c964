"""The arithmetic floor: a backbone's FLOPs per image over the device's measured matrix-multiply rate.

The rate is measured in the same run (bf16 on a GPU, fp32 on a CPU: the precisions the extraction uses), so a
fraction of the floor compares a stage with what this very machine can do, not with a datasheet.
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def flops_per_image(net: torch.nn.Module, size: int, device: str) -> int:
    """Forward FLOPs (2 per multiply-add) of one image, as torch's FLOP counter counts them."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, size, size, device=device))
    return counter.get_total_flops()


def matmul_rate(device: str, seconds: float = 2.0) -> dict:
    """Sustained FLOP/s of square matrix multiplies: bf16 n=8192 on a GPU, fp32 n=1024 on a CPU."""
    gpu = device == "cuda"
    n, dtype = (8192, torch.bfloat16) if gpu else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ b
        sync()
        count += 10
    elapsed = time.perf_counter() - start
    return {"flops_per_s": 2 * n**3 * count / elapsed, "dtype": str(dtype).removeprefix("torch."), "n": n}
