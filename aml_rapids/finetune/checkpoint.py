"""The resumable state of a fine-tuning, torchvision's reference recipe: one dict (model, optimizer,
scheduler, the position in the run, the best validation so far and its weights, the per-step history, the
identity of the run, its precision and device) written with write-then-rename, so a kill or a full disk mid-write
leaves the previous checkpoint whole. ``best.pt`` is written again from the checkpoint's best weights when a run
resumes, so the two never disagree (a best found after the last checkpoint is found again, or not, by the
resumed run).

Random state needs no saving: every epoch's order and augmentations are drawn from (seed, epoch) and each step
seeds dropout from (seed, step), so a run resumed at any step continues exactly as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from ..features.store import identity_differences
from ..outputs import atomic_write

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
STATE_KEYS = ("model", "optimizer", "scheduler", "position", "identity", "config", "best_model", "run")  # as save writes


@dataclass
class Position:
    """Where a run stands: the next epoch to run and how many rows of its shuffled table are done, the steps
    so far, the best validation and how many validations since it, why it stopped (None: it has not)."""

    epoch: int = 0
    epoch_rows: int = 0
    step: int = 0
    best_loss: float = float("inf")
    best_accuracy: float | None = None
    best_step: int | None = None
    best_epoch: int | None = None
    bad_validations: int = 0
    stopped: str | None = None
    seconds: float = 0.0  # training time so far, over every resumed part
    history: list[dict] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # path -> why, of cells that could not be read


def host_copy(model) -> dict:
    """The model's state_dict on the CPU, detached: what best.pt holds (loadable on any machine)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _torch_save(obj, path: Path) -> None:
    try:
        torch.save(obj, path)
    except RuntimeError as exc:  # torch's writer reports a full disk as "PytorchStreamWriter failed writing file"
        raise OSError(f"torch.save failed: {exc}") from exc


def save(folder: Path, model, optimizer, scheduler, position: Position, identity: dict, config: dict,
         best: dict | None, run: dict) -> Path:
    """``run``: the precision the run trains in, what its probe measured and its device."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "position": asdict(position), "identity": identity, "config": config, "best_model": best, "run": run}
    return atomic_write(Path(folder) / CHECKPOINT, lambda tmp: _torch_save(state, tmp))


def save_best(folder: Path, best: dict) -> Path:
    """The best weights so far (``host_copy``) as a plain state_dict of the whole network (what ``features``
    loads)."""
    return atomic_write(Path(folder) / BEST, lambda tmp: _torch_save(best, tmp))


def load(folder: Path, identity: dict) -> dict | None:
    """The checkpoint in ``folder`` (None if there is none), refused if it is of another run."""
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on a file that is not a checkpoint
        raise DataError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); delete it to start "
                        "over") from None
    if not isinstance(state, dict) or "identity" not in state:
        raise DataError(f"{path} is not an aml-rapids fine-tuning checkpoint; use another folder (-o)")
    lacking = [key for key in STATE_KEYS if key not in state]
    if lacking:
        raise DataError(f"checkpoint {path} lacks {', '.join(lacking)} (written by another version of aml-rapids?); "
                        "--overwrite starts the run over")
    differs = identity_differences(state["identity"], identity)
    if differs:
        raise ConfigError(f"{path} is the checkpoint of another fine-tuning (it differs in {', '.join(differs)}); "
                          "resume with that run's manifest and settings, or use a new folder (-o), or --overwrite "
                          "to start over here")
    state["position"] = Position(**state["position"])
    return state
