"""The network a Grad-CAM reads: a registry backbone with a classification head on top, in fp32 eval mode, and
the module whose activations and gradients Grad-CAM takes.

Two kinds of head. A fine-tuned checkpoint keeps its own (its folder's finetune.json names the backbone and the
classes). Any store's backbone gets a linear probe: a logistic regression fitted on the backbone's stored
training features, folded together with their z-score into one ``nn.Linear`` on the truncated network, so a
frozen ImageNet network is explainable too. The probe's network is rebuilt from the weights the store records
and refused if its sha256 differs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn

from ..classify.backend import get_backend
from ..classify.data import load_features, select_rows
from ..data.manifest import same_content
from ..errors import ConfigError, DataError
from ..features.backbones import BackboneSpec, get_spec
from ..features.store import FeatureStore
from ..features.weights import PUBLISHED, WeightsError, build_network
from ..finetune.record import read_record

RANDOM_WEIGHTS = "none (random initialisation)"  # how a store records weights 'none'


@dataclass
class ExplainedNetwork:
    backbone: str
    model: nn.Module  # images, normalised as the backbone's registry entry says -> class logits
    layer: nn.Module  # the Grad-CAM layer, a module inside ``model``
    classes: list[str]
    kind: str  # "fine-tuned head" or "linear probe"
    head_words: str  # what the class scores come from, for titles and summaries
    weights: dict  # as a store's backbone entry: weights, sha256, pretrained, finetuned
    seen: Callable[[pd.DataFrame], np.ndarray]  # which manifest rows the head or the network trained on
    made_with: dict | None = None  # the config its inputs were preprocessed with (the store's, the fine-tuning's)

    @property
    def spec(self) -> BackboneSpec:
        return get_spec(self.backbone)

    def randomised(self, seed: int) -> "ExplainedNetwork":
        """The same architecture and head with every weight below the head re-initialised (seeded): the model
        randomisation test of Adebayo et al. (2018), whose maps should not resemble the trained ones."""
        fresh, _ = build_network(self.backbone, "none", seed)
        if self.kind == "linear probe":
            model = nn.Sequential(self.spec.truncate(fresh), copy.deepcopy(self.model[1]))
        else:
            self.spec.reset_head(fresh, len(self.classes))
            fresh.get_submodule(self.spec.head).load_state_dict(self.model.get_submodule(self.spec.head).state_dict())
            model = fresh
        return ExplainedNetwork(self.backbone, model.eval(), gradcam_layer(fresh, self.spec, model), self.classes,
                                self.kind, self.head_words + ", weights below it re-initialised",
                                {**self.weights, "weights": RANDOM_WEIGHTS, "pretrained": False}, self.seen,
                                self.made_with)


def seen_by(hashes: frozenset[str]) -> Callable[[pd.DataFrame], np.ndarray]:
    """Which manifest rows are cells among ``hashes`` (by file or pixel content, as everywhere)."""
    return lambda table: same_content(table, hashes).to_numpy()


def gradcam_layer(network: nn.Module, spec: BackboneSpec, within: nn.Module | None = None) -> nn.Module:
    """The registry's Grad-CAM layer of ``network`` (the whole torchvision model), checked to lie inside
    ``within`` (the model Grad-CAM runs: a truncated network keeps its modules)."""
    if spec.gradcam_layer is None:
        raise ConfigError(f"backbone {spec.name!r} has no known Grad-CAM layer (its timm feature_info names no module "
                          "of the network); explain it with `aml-rapids occlusion`, which needs no layer")
    try:
        layer = network.get_submodule(spec.gradcam_layer)
    except AttributeError:
        raise ConfigError(f"backbone {spec.name!r} has no layer {spec.gradcam_layer!r}, the Grad-CAM layer its "
                          "registry entry names") from None
    if within is not None and not any(m is layer for m in within.modules()):
        raise ConfigError(f"backbone {spec.name!r}: its Grad-CAM layer {spec.gradcam_layer!r} is not part of the "
                          "network that computes its features")
    return layer


def from_checkpoint(path: Path, backbone: str | None = None) -> ExplainedNetwork:
    """A fine-tuned network with its own head: ``best.pt`` of a fine-tuning folder (or the folder itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist (give a fine-tuning folder or its best.pt)")
    record = read_record(path)
    if record is None:
        raise DataError(f"{path} has no finetune.json beside it, so its backbone, its classes and the cells it saw "
                        "are unknown: give best.pt in the folder `aml-rapids finetune` wrote")
    about = record.about
    if backbone and backbone != about["backbone"]:
        raise ConfigError(f"--backbone {backbone}, but {path.parent / 'finetune.json'} says {path} fine-tuned "
                          f"{about['backbone']}")
    name = about["backbone"]
    spec = get_spec(name)
    if spec.head is None:
        raise ConfigError(f"backbone {name!r} has no classification head: explain it through a store (linear probe)")
    model, info = build_network(name, str(path))
    width = model.get_submodule(spec.head).out_features
    classes = [str(c) for c in about["classes"]]
    if len(classes) != width:
        raise DataError(f"checkpoint {path}: its head predicts {width} classes, but {path.parent / 'finetune.json'} "
                        f"names {len(classes)} ({', '.join(classes[:5])}); the checkpoint is not that fine-tuning's")
    weights = {"weights": info.source, "sha256": info.sha256, "pretrained": info.pretrained,
               "finetuned": info.finetuned.provenance() if info.finetuned else None}
    config = path.parent / "config.yaml"  # the fine-tuning's resolved config: how its cells were preprocessed
    made_with = yaml.safe_load(config.read_text()) if config.is_file() else None
    return ExplainedNetwork(name, model.eval(), gradcam_layer(model, spec), classes, "fine-tuned head",
                            f"its fine-tuned head ({path})", weights, seen_by(record.seen), made_with)


def _store_weights(entry: dict, backbone: str, store: Path) -> str:
    weights = entry["weights"]
    if weights == RANDOM_WEIGHTS:
        return "none"
    if weights not in PUBLISHED and not Path(weights).is_file():
        raise WeightsError(f"store {store} was extracted with {backbone} weights {weights}, which is not here: "
                           "run from the folder the extraction ran in, or copy the file there")
    return weights


def probe_weights(features: np.ndarray, labels: np.ndarray, backend: str, seed: int) -> tuple[nn.Linear, list[str]]:
    """A multinomial logistic regression on z-scored ``features``, folded with the z-score into one linear layer
    on the raw features; and its classes."""
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    classes, codes = np.unique(labels, return_inverse=True)  # integer labels: cuML takes no strings
    be = get_backend(backend)
    probe = be.LogisticRegression(max_iter=2000, C=1.0, **({"random_state": seed} if be.name == "sklearn" else {}))
    probe.fit(be.asarray((features - mean) / std), be.xp.asarray(codes.astype(np.int32)))
    coef = np.atleast_2d(be.to_host(probe.coef_).astype(np.float64))
    if coef.shape[1] != features.shape[1]:  # (features, classes), as some cuML versions give it
        coef = coef.T
    intercept = be.to_host(probe.intercept_).astype(np.float64).reshape(-1)
    if coef.shape[0] == 1:  # two classes: one logit difference
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
    linear = nn.Linear(features.shape[1], coef.shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(coef / std))
        linear.bias.copy_(torch.from_numpy(intercept - (coef * (mean / std)).sum(axis=1)))
    return linear, [str(c) for c in classes]


def probe_source(store_path: Path, backbone: str | None) -> tuple[FeatureStore, str, str]:
    """The store, which of its backbones to probe, and the weights to rebuild it from; checked in a moment,
    before the probe's fit takes its while."""
    store = FeatureStore.open(store_path)
    if backbone is None:
        if len(store.backbones) != 1:
            raise ConfigError(f"store {store_path} holds {', '.join(store.backbones)}: choose one with --backbone")
        backbone = store.backbones[0]
    if backbone not in store.backbones:
        raise ConfigError(f"store {store_path} has no backbone {backbone!r}; it has {', '.join(store.backbones)}")
    get_spec(backbone)
    select_rows(store, ("train",))  # a store without training rows has nothing to fit a probe on
    return store, backbone, _store_weights(store.meta["backbones"][backbone], backbone, store_path)


def from_probe(store_path: Path, backbone: str | None, backend: str, seed: int) -> ExplainedNetwork:
    """The store's backbone (rebuilt from the weights it records) with a linear probe fitted on its stored
    training features."""
    store, backbone, weights = probe_source(store_path, backbone)
    entry = store.meta["backbones"][backbone]
    spec = get_spec(backbone)
    network, info = build_network(backbone, weights, store.meta["features_seed"])
    if info.sha256 != entry["sha256"]:
        raise WeightsError(f"{backbone} weights {info.source} (sha256 {str(info.sha256)[:12]}...) are not the ones "
                           f"store {store_path} was extracted with ({str(entry['sha256'])[:12]}...)")
    features = spec.truncate(network)
    layer = gradcam_layer(network, spec, features)
    keep, rows = select_rows(store, ("train",))
    linear, classes = probe_weights(load_features(store, [backbone], keep), rows["label"].to_numpy(), backend, seed)
    # seen: the probe's training cells, and those a fine-tuned network trained or validated on
    seen = frozenset(rows["sha256"]) | (frozenset(rows["pixels_sha256"]) - {""})
    seen |= info.finetuned.seen if info.finetuned else frozenset()
    copies = int((rows["aug_index"] > 0).sum())
    words = (f"a linear probe fitted on {len(rows):,} stored train rows of {store_path}"
             + (f" ({copies:,} of them oversampled copies)" if copies else ""))
    return ExplainedNetwork(backbone, nn.Sequential(features, linear).eval(), layer, classes, "linear probe", words,
                            {k: entry.get(k) for k in ("weights", "sha256", "pretrained", "finetuned")},
                            seen_by(seen), store.meta.get("config"))
