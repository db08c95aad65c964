"""TensorRT on an NVIDIA GPU through torch-tensorrt (which must match the installed torch): the network
compiled ahead of time for one batch shape (a short batch is padded up to it), in fp32, fp16 or bf16, its
engines cached by torch-tensorrt's own engine cache under the engines folder."""

from __future__ import annotations

import torch

from .base import EXTRA, Choice, EngineUnavailable, Runner
from .cache import cache_root
from .target import Target

PRECISIONS = {"cpu": (), "cuda": ("fp32", "bf16", "fp16")}
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(target: Target, precision: str) -> Runner:
    try:
        import torch_tensorrt
    except ImportError:
        raise EngineUnavailable(f"engine tensorrt is not installed; install {EXTRA['tensorrt']}") from None
    if precision not in PRECISIONS[target.device]:
        raise EngineUnavailable(f"tensorrt runs {', '.join(PRECISIONS['cuda'])} on a GPU; not {precision} on the "
                                f"{target.device.upper()} (int8 and fp8 need NVIDIA modelopt's calibration, not built)")
    shape = (target.batch_size, 3, target.image_size, target.image_size)
    compiled = torch_tensorrt.compile(
        target.net, ir="dynamo", inputs=[torch_tensorrt.Input(shape, dtype=torch.float32)],
        enabled_precisions={DTYPE[precision]}, cache_built_engines=True, reuse_cached_engines=True,
        engine_cache_dir=str(cache_root() / "tensorrt"))

    def forward(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return compiled(images.float().contiguous()).float()

    return Runner(Choice("tensorrt", precision), forward, batch_size=target.batch_size)
