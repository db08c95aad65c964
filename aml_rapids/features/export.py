"""``aml-rapids export``: a backbone as ONNX and OpenVINO IR for edge devices (the published paper's future
work), its input normalisation inside, fp32 or int8, with ``export.json`` naming its input and output, and a
parity check against PyTorch fp32 on real (or, without any given, synthetic) cells: a file handed on is one
whose features were seen to agree. The files are built beside the folder and appear in it (replacing an earlier
export's, with ``overwrite``) only once every check has passed."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import RunConfig
from ..data.manifest import read_source
from ..errors import ConfigError
from ..loader.pipeline import PIXELS, Normalization
from ..logs import say
from ..outputs import file_sha256, prepare_fresh_dir, removed_if_left_empty
from ..provenance import software_versions
from .backbones import get_spec
from .engines import Choice, EngineUnavailable, calibration_cells
from .engines.base import EXTRA
from .engines.onnx_export import OUTPUT, export_onnx
from .engines.openvino_engine import quantize, to_ir
from .engines.parity import check
from .weights import load_backbone

FORMATS = ("onnx", "openvino")
INPUT = "pixels"
OUTPUTS = ("model.onnx", "model.xml", "model.bin", "export.json")


class WithNormalization(nn.Module):
    """RGB in [0, 1] -> features: the registry's normalisation folded in front of the network, so an edge
    runtime hands it the segmented, resized cell as it is."""

    def __init__(self, net: nn.Module, norm: Normalization):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net((pixels - self.mean) / self.std)


@dataclass
class Exported:
    folder: Path
    files: dict[str, str]  # file name -> sha256
    parity: dict[str, dict]  # format -> agreement with PyTorch fp32 on the check cells
    cells: str  # what the check (and int8 calibration) ran on


def _check_cells(cells: Path | None, cfg: RunConfig, precision: str, work: Path) -> tuple[torch.Tensor, str]:
    """RGB [0, 1] cells, segmented and resized: ``features.calibration_cells`` (int8:
    ``features.int8_calibration_cells``) of the given source's training cells, or without a source (fp32 only)
    synthetic demo cells."""
    cpu = cfg.model_copy(update={"loader": cfg.loader.model_copy(update={"device": "cpu"})})
    if cells is None:
        if precision == "int8":
            raise ConfigError("int8 is calibrated on cells: give --cells (a manifest, folder or CSV of training cells)")
        from ..data.synthetic import write_demo_dataset
        write_demo_dataset(work / "synthetic", 1, max(1, cfg.features.calibration_cells // 5))
        cells, what = work / "synthetic", "synthetic demo cells (no --cells given)"
    else:
        what = str(cells)
    count = cfg.features.int8_calibration_cells if precision == "int8" else cfg.features.calibration_cells
    calibration = calibration_cells(read_source(cells, cfg.index), cpu, {INPUT: PIXELS}, count)
    pixels = calibration.images[INPUT]
    return pixels, f"{len(pixels)} cells of {what} (sha256 digest {calibration.digest[:16]})"


def _quantized_onnx(path: Path, pixels: torch.Tensor) -> None:
    import onnx

    onnx.save(quantize(onnx.load(str(path)), pixels, INPUT), str(path))


def _features(fmt: str, folder: Path, pixels: torch.Tensor) -> torch.Tensor:
    """The exported file's features of ``pixels``, as its runtime computes them (OpenVINO in fp32 for an fp32
    export: what a device without bf16 runs)."""
    if fmt == "onnx":
        import onnxruntime as ort
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {INPUT: pixels.numpy()})[0])
    import openvino as ov
    compiled = ov.Core().compile_model(str(folder / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return torch.from_numpy(compiled(pixels.numpy())[0].copy())


def _require(formats: tuple[str, ...], precision: str) -> None:
    """The runtimes the export and its check need, named with what to install where one is missing."""
    import importlib.util

    needed = {"onnx": ["onnxruntime"], "openvino": ["openvino"]}
    for module in sorted({m for f in formats for m in needed[f]} | ({"nncf"} if precision == "int8" else set())):
        if importlib.util.find_spec(module) is None:
            raise EngineUnavailable(f"export needs {module}, which is not installed; install "
                                    f"{EXTRA['openvino' if module == 'nncf' else module]}")


def export_backbone(backbone: str, weights: str, out: Path, cfg: RunConfig, formats: tuple[str, ...] = FORMATS,
                    precision: str = "fp32", cells: Path | None = None, overwrite: bool = False) -> Exported:
    """Write ``backbone`` with ``weights`` into ``out`` in each of ``formats``, checked against PyTorch fp32."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ConfigError(f"unknown export format {', '.join(unknown) or '(none given)'}; choose from {', '.join(FORMATS)}")
    if precision not in ("fp32", "int8"):
        raise ConfigError(f"export writes fp32 or int8 files, not {precision} (bf16 is a runtime's choice: "
                          "OpenVINO runs an fp32 IR in bf16 on CPUs that have it)")
    _require(formats, precision)
    spec = get_spec(backbone)
    size = spec.input_size or cfg.loader.image_size
    if size != cfg.loader.image_size:
        cfg = cfg.model_copy(update={"loader": cfg.loader.model_copy(update={"image_size": size})})
    net, made = load_backbone(backbone, weights, cfg.features.seed)
    model = WithNormalization(net, spec.normalization).eval()
    fresh = not Path(out).exists()
    out = prepare_fresh_dir(Path(out), "export folder", OUTPUTS, overwrite, delete=False)  # checked, kept as it is
    with removed_if_left_empty(out, fresh), tempfile.TemporaryDirectory(prefix=f".{out.name}.export-",
                                                                        dir=out.parent) as scratch:  # beside it
        work = Path(scratch)
        pixels, cells_used = _check_cells(cells, cfg, precision, work)
        with torch.inference_mode():
            reference = model(pixels)
        (work / "files").mkdir()
        onnx = export_onnx(model, work / "files" / "model.onnx", size, INPUT, backbone)
        if "openvino" in formats:
            to_ir(onnx, work / "files", pixels if precision == "int8" else None, INPUT)
        if "onnx" not in formats:
            onnx.unlink()
        elif precision == "int8":
            _quantized_onnx(onnx, pixels)
        advice = "Nothing was written; export fp32, or calibrate on more or other cells (--cells)"
        parity = {fmt: check(backbone, Choice(fmt, precision), reference, _features(fmt, work / "files", pixels),
                             advice, cfg.features.min_cosine.get(precision)) for fmt in formats}
        files = {p.name: file_sha256(p) for p in sorted((work / "files").iterdir())}
        prepare_fresh_dir(out, "export folder", OUTPUTS, overwrite)  # every check passed: the earlier export goes
        record = {
            "backbone": backbone, "dim": spec.dim, "layer": spec.layer, "precision": precision,
            "weights": {"source": made.source, "sha256": made.sha256, "pretrained": made.pretrained},
            "input": {"name": INPUT, "shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW",
                      "colour": "RGB", "range": [0.0, 1.0],
                      "preprocessing": f"decode, HSV segmentation (background set to black), resize to {size}x{size}, "
                                       "as aml-rapids' loader does; the normalisation below is inside the model",
                      "normalization": {"mean": list(spec.normalization.mean), "std": list(spec.normalization.std)},
                      "segmentation": cfg.segmentation.model_dump(mode="json")},
            "output": {"name": OUTPUT, "shape": ["batch", spec.dim], "dtype": "float32"},
            "files": files, "parity": parity, "check_cells": cells_used,
            "versions": software_versions()}
        for name in files:
            shutil.move(str(work / "files" / name), out / name)
        (out / "export.json").write_text(json.dumps(record, indent=1))
    for fmt, measured in parity.items():
        say(f"{fmt}: features agree with PyTorch fp32 at cosine {measured['min_cosine']:.5f} at worst "
            f"(median {measured['median_cosine']:.6f}) on {cells_used}")
    return Exported(out, files, parity, cells_used)
