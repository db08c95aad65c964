"""Inference engines behind one call (``prepare``): PyTorch, OpenVINO, ONNX Runtime and TensorRT, each in the
precisions it runs, every one checked against PyTorch fp32 by the parity guard before it is used."""

from .base import ENGINES, PRECISIONS, Choice, EngineUnavailable, ParityError, Runner
from .select import needs_calibration, prepare
from .target import Calibration, Target, calibration_cells, calibration_of

__all__ = ["ENGINES", "PRECISIONS", "Calibration", "Choice", "EngineUnavailable", "ParityError", "Runner", "Target",
           "calibration_cells", "calibration_of", "needs_calibration", "prepare"]
