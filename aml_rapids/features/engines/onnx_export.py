"""A backbone as an ONNX graph with a batch axis of any size: what ONNX Runtime runs and ``aml-rapids export``
hands to edge devices. torch's TorchScript exporter: it needs no extra package and converts every registry
network (the dynamo exporter would add onnxscript)."""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .base import EngineUnavailable
from .cache import artefact
from .target import Target

OPSET = 18
INPUT, OUTPUT = "images", "features"


def export_onnx(net: nn.Module, path: Path, image_size: int, input_name: str = INPUT,
                backbone: str = "the network") -> Path:
    """``net`` as an ONNX graph at ``path``; a network the exporter cannot convert (an operator ONNX lacks) is
    ``EngineUnavailable``, naming the operator."""
    net = copy.deepcopy(net).cpu().eval()  # the caller's network stays where it is
    example = torch.zeros(1, 3, image_size, image_size)
    try:
        with warnings.catch_warnings(), _native_output_held():
            warnings.simplefilter("ignore")  # the exporter's notices (its successor, constant folding) help no user
            torch.onnx.export(net, (example,), str(path), input_names=[input_name], output_names=[OUTPUT],
                              dynamic_axes={input_name: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=OPSET,
                              dynamo=False)
    except (torch.onnx.errors.OnnxExporterError, RuntimeError) as exc:
        raise EngineUnavailable(f"{backbone} cannot be written as ONNX (opset {OPSET}): {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return Path(path)


@contextmanager
def _native_output_held():
    """The exporter's C++ side prints the whole TorchScript graph to stdout (the --json summary's) when a network
    does not convert, hundreds of lines; its exception already names the operator. Held back here, at the file
    descriptor, for the export's duration (no other thread writes while networks are loaded)."""
    sys.stdout.flush()  # what Python has buffered is written before the descriptor is taken
    saved = os.dup(1)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def onnx_of(target: Target) -> Path:
    """The backbone's ONNX graph in the engine cache: one export serves ONNX Runtime and OpenVINO."""
    fields = target.cache_fields("onnx", "fp32", {"torch": torch.__version__, "opset": OPSET})
    return artefact(fields, lambda work: export_onnx(target.net, work / "model.onnx", target.image_size,
                                                     backbone=target.backbone)) / "model.onnx"
