"""ONNX Runtime on the CPU (or its CUDA provider, with onnxruntime-gpu), fp32: its graph optimiser fuses batch
norm and activations into the convolutions, and it runs the exported graph of ``onnx_export``."""

from __future__ import annotations

import torch

from ...provenance import usable_cores
from .base import EXTRA, Choice, EngineUnavailable, Runner
from .onnx_export import INPUT, onnx_of
from .target import Target

PRECISIONS = {"cpu": ("fp32",), "cuda": ("fp32",)}
PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def build(target: Target, precision: str) -> Runner:
    try:
        import onnxruntime as ort
    except ImportError:
        raise EngineUnavailable(f"engine onnxruntime is not installed; install {EXTRA['onnxruntime']}") from None
    if precision not in PRECISIONS[target.device]:
        raise EngineUnavailable(f"onnxruntime runs fp32 here, not {precision} (bf16 and int8 run on openvino)")
    provider = PROVIDER[target.device]
    if provider not in ort.get_available_providers():
        raise EngineUnavailable(f"this onnxruntime has no {provider} (it has {', '.join(ort.get_available_providers())}); "
                                "install onnxruntime-gpu for the GPU")
    graph = onnx_of(target)
    options = ort.SessionOptions()
    options.intra_op_num_threads = usable_cores()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(graph), options, providers=[provider])

    def forward(images: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {INPUT: images.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(images.device)

    return Runner(Choice("onnxruntime", precision), forward, artefact=str(graph))
