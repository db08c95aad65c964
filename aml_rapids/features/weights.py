"""Weights for a backbone: its published ones (``imagenet`` or ``pretrained``: torchvision's ImageNet weights,
a timm model's pretrained tag, a preset's release; ``published.py`` finds them), a local state_dict or
checkpoint file, or ``none`` (seeded random initialisation). Whatever was used is recorded with its sha256, and
a file written by ``aml-rapids finetune`` also with what it was fine-tuned on (``finetune.json`` beside it)."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import AmlRapidsError, ConfigError, DownloadError, WeightsError
from ..outputs import file_sha256
from ..finetune.record import UNKNOWN, FinetuneRecord, read_record
from ..logs import log
from . import published
from .backbones import BackboneSpec, Published, get_spec, public_specs
from .timm_backbones import HUB, PREFIX, PRESETS, hub_repo

PUBLISHED = ("imagenet", "pretrained")  # the keywords for a network's published weights
HUB_NAME = PREFIX + HUB


@dataclass(frozen=True)
class WeightsInfo:
    """Provenance of the weights one backbone ran with."""

    source: str
    sha256: str | None
    pretrained: bool
    finetuned: FinetuneRecord | None = None  # the cells and split the weights were fine-tuned on


def list_backbones() -> list[dict]:
    """Every network users choose from: the torchvision ones, the hematology presets, and the timm models whose
    weights are on this machine (and any other asked for in this process); with feature size, layer, input size,
    and whether its published weights are here (``weights: imagenet`` works offline only then; a local file
    always does)."""
    for name in [*PRESETS, *sorted({row["backbone"] for row in published.cached(checksums=False) if row["backbone"]})]:
        try:
            get_spec(name)
        except AmlRapidsError as exc:  # a cached hub repository that timm cannot build: said, not listed
            log.warning(f"{name} is cached but cannot be listed: {exc}")
    out = []
    for spec in public_specs():
        found = published.find(spec) if spec.published else None
        out.append({"name": spec.name, "dim": spec.dim, "layer": spec.layer,
                    "input_size": spec.input_size and f"{spec.input_size}x{spec.input_size}",
                    "weights": {"published": spec.published and spec.published.words, "cached": found is not None,
                                "path": str(found.path) if found else None, "place": found.place if found else None},
                    "citation": PRESETS[spec.name].citation if spec.name in PRESETS else None})
    return out


def fetch_weights(names: list[str], to: Path | None = None, file: Path | None = None) -> list[dict]:
    """``aml-rapids weights fetch``: each network's published weights downloaded into the loaders' caches (or
    into ``to``, to copy to an offline node), or a local ``file`` registered as one network's, once it loads into
    that network; each with its path and sha256."""
    if not names:
        raise ConfigError("name at least one backbone (`aml-rapids backbones` lists them)")
    if file is not None and len(names) != 1:
        raise ConfigError(f"--file registers one file as one backbone's weights; {len(names)} backbones were named")
    if file is not None and to is not None:
        raise ConfigError("--file registers a local file on this machine, --to downloads for another one: give one")
    rows = []
    for name in names:
        try:
            found = _fetch_one(name, to, file)
        except DownloadError as exc:
            raise DownloadError(f"{exc}. Where there is no internet, run `aml-rapids weights fetch {name} --to DIR` "
                                f"on a machine that has it and copy DIR here, or register a local copy: "
                                f"`aml-rapids weights fetch {name} --file FILE`") from None
        digest = file_sha256(found.path)
        if found.place == "torch cache":
            check_published(get_spec(name), found.path, digest)
        rows.append({"backbone": name, "place": found.place, "path": str(found.path), "sha256": digest})
    return rows


def _fetch_one(name: str, to: Path | None, file: Path | None) -> published.Found:
    if file is not None:
        spec = get_spec(name)
        return published.register(spec, file, lambda path: load_state(spec, spec.build(), path))
    if name.startswith(HUB_NAME):  # its config.json first: the network is built from it
        return published.fetch(name, Published(name, hf_repo=hub_repo(name)), to, config=True)
    spec = get_spec(name)
    if spec.published is None:
        raise WeightsError(f"backbone {name!r} has no published weights to fetch; register a file (--file) or use "
                           "weights: none")
    return published.fetch(name, spec.published, to)


def published_file(spec: BackboneSpec) -> published.Found:
    """The network's published weights on this machine, downloaded first where the network allows; a clear
    error naming every place looked at if not."""
    if spec.published is None:
        raise WeightsError(f"backbone {spec.name!r} has no published weights; use a file path or 'none'")
    found = published.find(spec)
    if found is None:
        try:
            if not spec.published.hash_in_name:  # torchvision's own files, checked by the hash in their names
                raise DownloadError("only `aml-rapids weights fetch` downloads weights other than torchvision's")
            with contextlib.redirect_stdout(sys.stderr):  # downloads print progress there; stdout is --json's
                found = published.fetch(spec.name, spec.published)
        except DownloadError as exc:
            raise WeightsError(
                f"the published weights of {spec.name} ({spec.published.words}) are not on this machine (looked at: "
                f"{published.places(spec)}) and were not downloaded: {exc}. Fetch them where there is internet "
                f"(`aml-rapids weights fetch {spec.name} --to DIR`) and copy DIR here, register a local copy "
                f"(`aml-rapids weights fetch {spec.name} --file FILE`), or pass a local file: "
                f"--set 'features.backbones=[{{name: {spec.name}, weights: /path/to/state_dict.pth}}]'") from None
    return found


def _read_state_dict(path: Path) -> dict:
    if path.is_dir():
        raise WeightsError(f"weights {path} is a folder; give the weights file itself")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on a file that is not a checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise WeightsError(f"cannot read weights file {path}: not a complete PyTorch state_dict or safetensors file "
                           f"({type(exc).__name__}{': ' + first if first else ''})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if isinstance(state, dict) and isinstance(state.get("teacher"), dict):  # a DINO training checkpoint
        state = {k.removeprefix("backbone."): v for k, v in state["teacher"].items() if k.startswith("backbone.")}
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _fitted(spec: BackboneSpec, model: nn.Module, state: dict) -> dict:
    """``state`` with a release's key names mapped onto the network's (timm's own converter for its model
    family, e.g. DINOv2's original names) where they differ; a file saved from the network is left as it is."""
    if spec.adapt_state is None or set(state) == set(model.state_dict()):
        return state
    try:
        return spec.adapt_state(state, model)
    except (KeyError, ValueError, RuntimeError, AttributeError, TypeError):  # not one of the family's releases:
        return state  # _load_into names what does not fit


def _load_into(model: nn.Module, state: dict, path: Path, name: str) -> None:
    own = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if wrong or missing or unexpected:
        parts = [f"{len(wrong)} shape mismatches (first: {'; '.join(wrong[:3])})" if wrong else "",
                 f"{len(missing)} missing keys ({', '.join(missing[:3])})" if missing else "",
                 f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])})" if unexpected else ""]
        raise WeightsError(f"weights {path} do not fit {name}: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True)


def check_published(spec: BackboneSpec, path: Path, digest: str) -> None:
    """torchvision names each checkpoint by its sha256's first digits: a file of that name with other contents
    (a random state_dict saved there) would otherwise be used and reported as ImageNet weights."""
    named = torch.hub.HASH_REGEX.search(path.name) if spec.published.hash_in_name else None
    if named and not digest.startswith(named.group(1)):
        raise WeightsError(f"{path} is not torchvision's ImageNet checkpoint for {spec.name}: its sha256 "
                           f"{digest[:12]}... does not start with {named.group(1)}, as its name says; delete it and "
                           "put the real file there")


def load_state(spec: BackboneSpec, model: nn.Module, path: Path) -> bool:
    """Load the weights file ``path`` into ``model`` (the whole network); a file whose head predicts other
    classes than the network's (a fine-tuned one) gives it a head of that size first. Returns whether it did."""
    state = _fitted(spec, model, _read_state_dict(path))
    head = {k for k in model.state_dict() if k.startswith(f"{spec.head}.")}
    if spec.reset is not None and head and not head & set(state) and set(model.state_dict()) - set(state) == head:
        spec.reset(model, 0)  # an encoder saved headless (as hub encoders are): its features need no head
    retrained = spec.head is not None and f"{spec.head}.weight" in state and (
        spec.classes_of(state) != spec.head_width(model))
    if retrained:
        spec.reset_head(model, spec.classes_of(state))
    _load_into(model, state, path, spec.name)
    return retrained


def build_network(name: str, weights: str = "imagenet", seed: int = 0) -> tuple[nn.Module, WeightsInfo]:
    """The whole network (its head included) with these weights."""
    spec = get_spec(name)
    torch.manual_seed(seed)
    model = spec.build()
    if weights == "none":
        info = WeightsInfo("none (random initialisation)", None, False)
    else:
        found = published_file(spec) if weights in PUBLISHED else None
        path = found.path if found else Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file {path} for {name} does not exist")
        digest = file_sha256(path)
        if found and found.place == "torch cache":
            check_published(spec, path, digest)
        if found:
            published.verify(found, digest, name)
        retrained = load_state(spec, model, path)
        record = None if weights in PUBLISHED else read_record(path)
        if record is None and retrained:
            log.warning(f"weights {path} have a {spec.head_width(model)}-class head but no finetune.json beside "
                        "them: the cells they were fine-tuned on are unknown, so evaluation cannot refuse them; "
                        "keep a fine-tuning's best.pt in its folder")
            record = UNKNOWN
        source = ("imagenet" if spec.published.hash_in_name else "pretrained") if weights in PUBLISHED else str(path)
        info = WeightsInfo(source, digest, True, record)
    return model, info


def load_backbone(name: str, weights: str = "imagenet", seed: int = 0) -> tuple[nn.Module, WeightsInfo]:
    """The truncated feature network in eval mode, and where its weights came from."""
    model, info = build_network(name, weights, seed)
    return get_spec(name).truncate(model).eval(), info
