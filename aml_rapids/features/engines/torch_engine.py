"""PyTorch itself: batch norm folded into the convolutions (inference only: 2x for MobileNetV2 on a CPU), in
channels_last, optionally torch.compile'd, under bf16/fp16 autocast where asked (torch's own bf16 on a CPU
runs on its bf16 instructions where the CPU has them, and slowly where not: ``auto`` measures it)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.fx.proxy import TraceError

from ...logs import log
from .base import Choice, EngineUnavailable, Runner
from .target import Target

PRECISIONS = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "bf16", "fp16")}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compile_settings(mode: str, device: str) -> dict:
    """torch.compile's mode; on a CPU its options with the weights frozen in as well (ResNet-101 1.25x eager
    there, not 1.15x), since torch.compile takes a mode or options, not both."""
    if device == "cpu":
        from torch._inductor import list_mode_options  # 1 s to import: only where a network is compiled
        return {"options": {**list_mode_options(mode, False), "freezing": True}}
    return {"mode": mode}


def folded(net: nn.Module, backbone: str) -> nn.Module:
    """A copy of ``net`` with its batch norm folded into the convolutions before it; the network copied as it
    is where it has no batch norm (a ViT, a ConvNeXt) or where torch.fx cannot trace it (control flow on input
    shapes, as a timm ViT's position embedding has), which changes speed, not features."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        return copy.deepcopy(net)
    try:
        return fuse(net)
    except TraceError as exc:
        log.info(f"{backbone}: batch norm left unfolded (torch.fx cannot trace the network: {exc})")
        return copy.deepcopy(net)


def build(target: Target, precision: str) -> Runner:
    if precision not in PRECISIONS[target.device]:
        raise EngineUnavailable(f"torch runs {', '.join(PRECISIONS[target.device])} on the {target.device.upper()}, "
                                f"not {precision} (int8 runs on openvino)")
    net = folded(target.net, target.backbone)  # a copy: the registry network stays the fp32 reference
    if target.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if target.compile:
        net = torch.compile(net, dynamic=False, **compile_settings(target.compile_mode, target.device))
    autocast = torch.autocast(target.device, dtype=AUTOCAST.get(precision, torch.float32),
                              enabled=precision in AUTOCAST)
    cast = precision not in AUTOCAST  # fp32 takes float32 input (a GPU loader may hand over fp16); autocast casts

    def forward(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast:
            return net(images.float() if cast else images).float()

    return Runner(Choice("torch", precision), forward, channels_last=target.channels_last,
                  batch_size=target.batch_size if target.compile else None)
