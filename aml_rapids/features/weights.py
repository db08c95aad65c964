"""Weights for a backbone: ``imagenet`` (torchvision's weights and cache), a local state_dict or checkpoint
file, or ``none`` (seeded random initialisation). Whatever was used is recorded with its sha256, and a file
written by ``aml-rapids finetune`` also with what it was fine-tuned on (``finetune.json`` beside it)."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import torch
from torch import nn
from torchvision.models import get_weight

from ..errors import DataError
from ..outputs import file_sha256
from ..finetune.record import UNKNOWN, FinetuneRecord, read_record
from ..logs import log
from .backbones import BackboneSpec, get_spec, public_specs


class WeightsError(DataError):
    """Weights that cannot be found or do not fit the network."""


@dataclass(frozen=True)
class WeightsInfo:
    """Provenance of the weights one backbone ran with."""

    source: str
    sha256: str | None
    pretrained: bool
    finetuned: FinetuneRecord | None = None  # the cells and split the weights were fine-tuned on


def imagenet_cache(spec: BackboneSpec) -> tuple[str, Path]:
    """Where torchvision downloads a network's ImageNet checkpoint from, and where it caches it."""
    url = get_weight(spec.imagenet_weights).url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def list_backbones() -> list[dict]:
    """Every network users choose from: name, feature size, layer, input size, and whether its ImageNet
    weights are on this machine (``weights: imagenet`` works offline only then; a local file always does)."""
    out = []
    for spec in public_specs():
        if spec.imagenet_weights is None:
            imagenet = {"cached": False, "path": None, "url": None}
        else:
            url, cached = imagenet_cache(spec)
            imagenet = {"cached": cached.is_file(), "path": str(cached), "url": url}
        out.append({"name": spec.name, "dim": spec.dim, "layer": spec.layer,
                    "input_size": spec.input_size and f"{spec.input_size}x{spec.input_size}", "imagenet": imagenet})
    return out


def _imagenet_file(spec: BackboneSpec) -> Path:
    """The cached torchvision checkpoint, downloaded if the network allows; a clear error if not."""
    if spec.imagenet_weights is None:
        raise WeightsError(f"backbone {spec.name!r} has no ImageNet weights; use a file path or 'none'")
    url, cached = imagenet_cache(spec)
    if not cached.is_file():
        try:
            with contextlib.redirect_stdout(sys.stderr):  # torch prints "Downloading ..." there; stdout is --json's
                torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True)
        except (URLError, OSError, RuntimeError) as exc:
            raise WeightsError(
                f"ImageNet weights for {spec.name} are not cached at {cached} and could not be downloaded ({exc}). "
                f"Fetch {url} on a machine with internet and copy it to {cached} (or set TORCH_HOME), or pass a "
                f"local file: --set 'features.backbones=[{{name: {spec.name}, weights: /path/to/state_dict.pth}}]'"
            ) from None
    return cached


def _read_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on a file that is not a checkpoint
        raise WeightsError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(model: nn.Module, state: dict, path: Path, name: str) -> None:
    own = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if wrong or missing or unexpected:
        parts = [f"{len(wrong)} shape mismatches ({'; '.join(wrong[:3])})" if wrong else "",
                 f"{len(missing)} missing keys ({', '.join(missing[:3])})" if missing else "",
                 f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])})" if unexpected else ""]
        raise WeightsError(f"weights {path} do not fit {name}: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True)


def build_network(name: str, weights: str = "imagenet", seed: int = 0) -> tuple[nn.Module, WeightsInfo]:
    """The whole network (its head included) with these weights; a file whose head predicts other classes
    than ImageNet's (a fine-tuned network) gets a head of its size first."""
    spec = get_spec(name)
    torch.manual_seed(seed)
    model = spec.build()
    if weights == "none":
        info = WeightsInfo("none (random initialisation)", None, False)
    else:
        path = _imagenet_file(spec) if weights == "imagenet" else Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file {path} for {name} does not exist")
        digest = file_sha256(path)
        named = torch.hub.HASH_REGEX.search(path.name) if weights == "imagenet" else None
        if named and not digest.startswith(named.group(1)):  # torchvision names its checkpoints by their hash
            raise WeightsError(f"{path} is not torchvision's ImageNet checkpoint for {name}: its sha256 "
                               f"{digest[:12]}... does not start with {named.group(1)}, as its name says; delete "
                               "it and put the real file there")
        state = _read_state_dict(path)
        retrained = spec.head is not None and f"{spec.head}.weight" in state and (
            spec.classes_of(state) != model.get_submodule(spec.head).out_features)
        if retrained:
            spec.reset_head(model, spec.classes_of(state))
        _load_into(model, state, path, name)
        record = None if weights == "imagenet" else read_record(path)
        if record is None and retrained:
            log.warning(f"weights {path} have a {spec.classes_of(state)}-class head but no finetune.json beside "
                        "them: the cells they were fine-tuned on are unknown, so evaluation cannot refuse them; "
                        "keep a fine-tuning's best.pt in its folder")
            record = UNKNOWN
        info = WeightsInfo("imagenet" if weights == "imagenet" else str(path), digest, True, record)
    return model, info


def load_backbone(name: str, weights: str = "imagenet", seed: int = 0) -> tuple[nn.Module, WeightsInfo]:
    """The truncated feature network in eval mode, and where its weights came from."""
    model, info = build_network(name, weights, seed)
    return get_spec(name).truncate(model).eval(), info
