"""The arithmetic floor: a backbone's FLOPs per image over the device's measured matrix-multiply rate.

The rate is measured in the same run, in the precision each variant computes in (fp32, bf16, fp16, int8), so a
fraction of the floor compares a stage with what this very machine can do in that precision, not with a
datasheet.
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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


def matmul_rate(device: str, precision: str = "fp32", seconds: float = 2.0) -> dict:
    """Sustained FLOP/s (int8: operations/s) of square matrix multiplies in ``precision``: n=8192 on a GPU
    (fp32 with TF32 off), n=1024 on a CPU; int8 through torch's int8 matmul (int32 accumulation)."""
    gpu = device == "cuda"
    n, dtype = (8192 if gpu else 1024), DTYPES[precision]
    if dtype == torch.int8:
        a, b = (torch.randint(-128, 127, (n, n), device=device, dtype=dtype) for _ in range(2))
        multiply = torch._int_mm
    else:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        multiply = torch.matmul
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for _ in range(3):
            multiply(a, b)
        sync()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(10):
                multiply(a, b)
            sync()
            count += 10
        elapsed = time.perf_counter() - start
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"flops_per_s": 2 * n**3 * count / elapsed, "dtype": str(dtype).removeprefix("torch."), "n": n}
