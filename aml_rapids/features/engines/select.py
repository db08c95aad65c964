"""Which engine and precision runs a backbone: the one asked for, or under ``auto`` the fastest measured on
this machine among those whose features pass the parity guard, remembered for the next run.

Every choice is checked against PyTorch fp32 on the calibration cells, each run (a cached artefact or a
remembered choice is never trusted unchecked). ``auto`` chooses among fp32, bf16 and fp16 only: int8 and fp8
trade agreement for speed, so they run only when asked for by name. A lower precision must be at least
``KEEP_HIGHER`` times as fast as a higher one to be chosen over it.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from ...errors import AmlRapidsError
from ...logs import log, warn
from ...provenance import machine_info, software_versions
from . import onnxruntime_engine, openvino_engine, tensorrt_engine, torch_engine
from .base import ENGINES, Choice, EngineUnavailable, ParityError, Runner, padded
from .cache import remember, remembered
from .parity import check
from .target import Target

BUILDERS = {"torch": torch_engine, "openvino": openvino_engine, "onnxruntime": onnxruntime_engine,
            "tensorrt": tensorrt_engine}
AUTO_PRECISIONS = ("fp32", "bf16", "fp16")
RANK = {"fp32": 3, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}  # how closely each keeps fp32's features
KEEP_HIGHER = 1.1
TIMED_CELLS = 16  # auto times each candidate on this many of the calibration cells (each is checked on all)
REFERENCE = Choice("torch", "fp32")


def candidates(engine: str, precision: str, device: str) -> list[Choice]:
    engines = ENGINES if engine == "auto" else (engine,)
    precisions = AUTO_PRECISIONS if precision == "auto" else (precision,)
    return [Choice(e, p) for e in engines for p in precisions if p in BUILDERS[e].PRECISIONS[device]]


def needs_calibration(engine: str, precision: str) -> bool:
    """Anything but PyTorch fp32 itself is checked against it (and int8 calibrated) on calibration cells."""
    return (engine, precision) != (REFERENCE.engine, REFERENCE.precision)


def prepare(target: Target, engine: str, precision: str) -> Runner:
    """The runner for ``target``: ``engine`` and ``precision`` as configured (either may be ``auto``)."""
    if not needs_calibration(engine, precision):
        return torch_engine.build(target, "fp32")
    asked = candidates(engine, precision, target.device)
    if not asked:
        where = "GPU" if target.device == "cuda" else "CPU"
        runs = sorted({p for e in (ENGINES if engine == "auto" else (engine,)) for p in BUILDERS[e].PRECISIONS[target.device]})
        if not runs:
            raise EngineUnavailable(f"engine {engine} does not run on the {where} here (for {target.backbone}); choose "
                                    "another engine (features.engine), or auto")
        raise EngineUnavailable(f"engine {engine} runs no {precision} on the {where} (it runs {', '.join(runs)}; for "
                                f"{target.backbone}); choose another precision, or auto")
    if target.calibration is None:
        raise ValueError("engines other than torch fp32 need calibration cells")
    reference = _reference(target)
    if len(asked) == 1:
        try:
            return _checked(target, asked[0], reference)
        except ParityError as exc:
            raise ParityError(f"{exc}. Choose another engine or precision (features.engine / features.precision), "
                              "or auto; or, knowing what it costs, a lower threshold (features.min_cosine)") from None
    return _auto(target, asked, reference)


def _reference(target: Target) -> torch.Tensor:
    """PyTorch fp32 features of the calibration cells: the registry network as it is, TF32 off on a GPU."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            return target.net(target.calibration).float().cpu()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _checked(target: Target, choice: Choice, reference: torch.Tensor) -> Runner:
    """Built and checked; a network the engine cannot convert is reported as such (EngineUnavailable)."""
    try:
        runner = BUILDERS[choice.engine].build(target, choice.precision)
        features = _forward(runner, target.calibration)
    except AmlRapidsError:
        raise
    except Exception as exc:  # conversion fails in engine-specific ways; the user needs the engine's words
        if "KeyboardInterrupt" in f"{exc!r}":  # OpenVINO's converter wraps a Ctrl-C in its own RuntimeError
            raise KeyboardInterrupt from None
        raise EngineUnavailable(f"{choice} cannot run {target.backbone}: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    runner.measured = check(target.backbone, choice, reference, features,
                            threshold=target.min_cosine.get(choice.precision))
    return runner


def _forward(runner: Runner, images: torch.Tensor) -> torch.Tensor:
    if runner.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    size = runner.batch_size or len(images)  # a fixed-shape engine: the cells in its batches, the last padded
    return torch.cat([runner(padded(images[i:i + size], size))[:len(images[i:i + size])].float().cpu()
                      for i in range(0, len(images), size)])


def _images_per_s(runner: Runner, images: torch.Tensor, seconds: float = 0.5) -> float:
    """Calibration cells per second through ``runner`` (already warm), timed for at least ``seconds``."""
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < seconds:
        _forward(runner, images)
        sync()
        calls += 1
    return calls * len(images) / (time.perf_counter() - start)


def _question(target: Target, asked: list[Choice]) -> dict:
    """What a remembered choice answered: this network on this machine among these candidates."""
    machine = machine_info()
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    versions = {k: v for k, v in software_versions().items()
                if k in ("torch", "openvino", "onnxruntime", "onnxruntime-gpu", "nncf", "torch-tensorrt")}
    fields = target.cache_fields("auto", "auto", versions)
    return {**fields, "asked": [str(c) for c in asked], "compile": [target.compile, target.compile_mode],
            "cpu": machine["cpu"], "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "cores": machine["cores"], "gpus": [g["name"] for g in machine["gpus"]]}


def _auto(target: Target, asked: list[Choice], reference: torch.Tensor) -> Runner:
    question = _question(target, asked)
    memo = remembered(question)
    if memo is not None:
        try:
            runner = _checked(target, Choice(memo["engine"], memo["precision"]), reference)
            runner.measured["auto"] = memo["measured"]
            log.info(f"engine auto for {target.backbone}: {runner.choice}, as measured on this machine before "
                     f"(parity cosine {runner.measured['min_cosine']:.5f} at worst on {runner.measured['cells']} cells)")
            return runner
        except (EngineUnavailable, ParityError) as exc:
            warn(f"the engine auto chose earlier for {target.backbone} ({memo['engine']} {memo['precision']}) no "
                 f"longer serves ({exc}); measuring again")
    runners, measured = [], {}
    for choice in asked:
        try:
            runner = _checked(target, choice, reference)
        except (EngineUnavailable, ParityError) as exc:
            measured[str(choice)] = f"not used: {exc}"
            continue
        runner.measured["images_per_s"] = _images_per_s(runner, target.calibration[:TIMED_CELLS])
        measured[str(choice)] = round(runner.measured["images_per_s"], 2)
        runners.append(runner)
    if not runners:
        raise EngineUnavailable(f"no engine could run {target.backbone}: " + "; ".join(
            f"{c}: {why}" for c, why in measured.items()))
    best = _best(runners)
    log.info(f"engine auto for {target.backbone}: {best.choice} (calibration cells/s: "
             + ", ".join(f"{c} {v}" for c, v in measured.items() if not isinstance(v, str)) + ")")
    best.measured["auto"] = measured
    remember(question, {"engine": best.choice.engine, "precision": best.choice.precision, "measured": measured})
    return best


def _best(runners: list[Runner]) -> Runner:
    """The fastest, unless a higher precision comes within ``KEEP_HIGHER`` of its speed."""
    fastest = max(runners, key=lambda r: r.measured["images_per_s"])
    close = [r for r in runners if r.measured["images_per_s"] * KEEP_HIGHER >= fastest.measured["images_per_s"]]
    return max(close, key=lambda r: (RANK[r.choice.precision], r.measured["images_per_s"]))
