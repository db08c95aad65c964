"""OpenVINO on the CPU: fp32, bf16 (on CPUs with bf16 instructions; OpenVINO's own default there) and int8
(post-training quantisation by NNCF, calibrated on the calibration cells). The network goes through the same
ONNX graph ONNX Runtime runs, and is cached as OpenVINO IR; compiling that for this CPU takes a fraction of a
second."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from importlib import metadata
from pathlib import Path

import torch

from ...provenance import usable_cores
from .base import EXTRA, Choice, EngineUnavailable, Runner
from .cache import artefact
from .onnx_export import INPUT, OPSET, onnx_of
from .target import Target

PRECISIONS = {"cpu": ("fp32", "bf16", "fp16", "int8"), "cuda": ()}
CAPABILITY = {"bf16": "BF16", "fp16": "FP16", "int8": "INT8"}  # what the CPU plugin must report for each
HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}  # int8: the quantised graph decides; the rest as OpenVINO picks


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        raise EngineUnavailable(f"int8 on openvino needs {package}; install {EXTRA['openvino']}") from None


@functools.lru_cache(maxsize=1)
def _core():
    try:
        import openvino as ov
    except ImportError:
        raise EngineUnavailable(f"engine openvino is not installed; install {EXTRA['openvino']}") from None
    return ov.Core()


def quantize(model, cells: torch.Tensor, input_name: str = INPUT):
    """int8 by NNCF's post-training quantisation, calibrated on ``cells`` as the model reads them: an OpenVINO
    model or an ONNX graph (NNCF takes either). Its progress goes to stderr."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # NNCF's import: "no CUDA runtime"
    try:
        import nncf
    except ImportError:
        raise EngineUnavailable(f"int8 needs nncf; install {EXTRA['openvino']}") from None
    nncf.set_log_level(logging.ERROR)  # its notices go to stdout, which may be --json's
    cells = cells.cpu().numpy()
    batches = [{input_name: cells[i:i + 16]} for i in range(0, len(cells), 16)]
    with contextlib.redirect_stdout(sys.stderr):
        return nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches))


def to_ir(onnx: Path, folder: Path, calibration: torch.Tensor | None = None, input_name: str = INPUT) -> Path:
    """An ONNX graph as OpenVINO IR (``model.xml`` and its ``.bin``) in ``folder``, int8 when calibration cells
    are given."""
    import openvino as ov

    model = ov.convert_model(str(onnx))
    if calibration is not None:
        model = quantize(model, calibration, input_name)
    ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=False)
    return folder / "model.xml"


def _convert(target: Target, precision: str, folder: Path) -> None:
    if precision == "int8" and target.quantize_cells is None:
        raise EngineUnavailable(
            f"the int8 network of {target.backbone} this store was made with (calibrated on cells of digest "
            f"{str(target.calibration_digest)[:16]}...) is not in the engine cache, and those cells are not at hand to "
            "calibrate it again; extract into a new store, or copy the engine cache of the machine that made it")
    to_ir(onnx_of(target), folder, target.quantize_cells if precision == "int8" else None)


def build(target: Target, precision: str) -> Runner:
    core = _core()
    if target.device != "cpu":
        raise EngineUnavailable("openvino runs on the CPU here; on a GPU choose torch, onnxruntime or tensorrt")
    if precision not in PRECISIONS["cpu"]:
        raise EngineUnavailable(f"openvino runs {', '.join(PRECISIONS['cpu'])}, not {precision}")
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if precision in CAPABILITY and CAPABILITY[precision] not in capabilities:
        raise EngineUnavailable(f"this CPU offers OpenVINO no {precision} ({', '.join(capabilities)})")
    import openvino

    versions = {"torch": torch.__version__, "opset": OPSET, "openvino": openvino.__version__}
    if precision == "int8":
        versions["nncf"] = _version("nncf")
    stored = "int8" if precision == "int8" else "float"  # fp32, bf16 and fp16 compile one IR with another hint
    folder = artefact(target.cache_fields("openvino", stored, versions), lambda work: _convert(target, precision, work))
    settings = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": usable_cores()}
    if precision in HINT:
        settings["INFERENCE_PRECISION_HINT"] = HINT[precision]
    compiled = core.compile_model(str(folder / "model.xml"), "CPU", settings)
    request = compiled.create_infer_request()

    def forward(images: torch.Tensor) -> torch.Tensor:
        out = request.infer(images.detach().contiguous().numpy(), share_inputs=True)
        return torch.from_numpy(out[0].copy())

    return Runner(Choice("openvino", precision), forward, artefact=str(folder))
