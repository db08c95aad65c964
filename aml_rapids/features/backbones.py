"""One registry of networks, timm-style: a name gives the network, its feature layer and dimension, its
classification head, its last convolutional block, its input normalisation and where its ImageNet weights come
from, so that extraction, fine-tuning and explanation treat every network alike.

Each network is built whole (so any state_dict of the full torchvision model loads, a fine-tuned one with its
new head included) and then truncated; the result is an ordinary differentiable ``nn.Module`` mapping NCHW
images to (N, dim). The head reads the feature layer's output (through the network's own dropout or ReLU), so
fine-tuning the whole network trains the features the hybrid classifier then reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision import models

from ..errors import ConfigError
from ..loader.pipeline import Normalization


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    dim: int
    layer: str
    normalization: Normalization
    build: Callable[[], nn.Module]
    truncate: Callable[[nn.Module], nn.Module]
    head: str | None  # the classification layer (an nn.Linear), a dotted module path; None: it has none
    last_block: str  # the last convolutional block (Grad-CAM's layer; fine-tuning's ``unfreeze: last_block``)
    imagenet_weights: str | None = None
    cam_layer: str | None = None  # Grad-CAM's layer where it is not ``last_block``'s output (see ``gradcam_layer``)
    tokens: bool = False  # the Grad-CAM layer outputs (N, 1 + patches, C): class token first, then a square grid
    input_size: int | None = None  # the one image size the network takes, if it has one (a ViT's patch grid)
    for_tests: bool = False  # a network for tests and smoke runs: accepted by name, never listed to users

    @property
    def gradcam_layer(self) -> str:
        """Where Grad-CAM reads activations and gradients. A ViT's last block's output reaches the class token
        only through the final norm, which reads the class token alone, so its patch tokens get no gradient;
        its last block's first norm still feeds them into the class token through attention."""
        return self.cam_layer or self.last_block

    def classes_of(self, state: dict) -> int:
        """How many classes the head of a state_dict of this network predicts."""
        return int(state[f"{self.head}.weight"].shape[0])

    def reset_head(self, model: nn.Module, num_classes: int) -> nn.Module:
        """``model`` with a new, freshly initialised head for ``num_classes`` (the ImageNet one replaced)."""
        old = model.get_submodule(self.head) if self.head else None
        if not isinstance(old, nn.Linear):
            raise ConfigError(f"backbone {self.name!r} has no classification head to replace (its registry entry "
                              f"names {self.head!r}), so it cannot be fine-tuned; choose another backbone")
        parent, _, name = self.head.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, nn.Linear(old.in_features, num_classes))
        return model


REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    REGISTRY[spec.name] = spec
    return spec


def public_specs() -> list[BackboneSpec]:
    """The networks users choose from (the test networks left out), by name."""
    return sorted((s for s in REGISTRY.values() if not s.for_tests), key=lambda s: s.name)


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(s.name for s in public_specs())
        raise ConfigError(f"unknown backbone {name!r}; known: {known} (`aml-rapids backbones` lists them)") from None


def _global_pool(body: nn.Module) -> nn.Module:
    return nn.Sequential(body, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _without_head(vit: nn.Module) -> nn.Module:
    vit.heads = nn.Identity()
    return vit


class TinyCNN(nn.Module):
    """A 2-layer CNN with 16 features and a head: for tests and smoke runs on two cores, never for results."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU())
        self.pool = _global_pool(nn.Identity())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


register(BackboneSpec(
    "mobilenet_v2", 1280, "global average pool after features", Normalization(),
    models.mobilenet_v2, lambda m: _global_pool(m.features), "classifier.1", "features.18",
    "MobileNet_V2_Weights.IMAGENET1K_V1"))
register(BackboneSpec(
    "resnet101", 2048, "pool5 (global average pool)", Normalization(),
    models.resnet101, lambda m: nn.Sequential(*list(m.children())[:-1], nn.Flatten()), "fc", "layer4",
    "ResNet101_Weights.IMAGENET1K_V1"))
register(BackboneSpec(
    "vgg16", 4096, "fc7 (before its ReLU, as MATLAB's activations('fc7'))", Normalization(),
    models.vgg16, lambda m: nn.Sequential(m.features, m.avgpool, nn.Flatten(), *list(m.classifier)[:4]),
    "classifier.6", "features.28", "VGG16_Weights.IMAGENET1K_V1"))
register(BackboneSpec(
    "vit_b_16", 768, "class token after the encoder (classification head removed)", Normalization(),
    models.vit_b_16, _without_head, "heads.head", "encoder.layers.encoder_layer_11",
    "ViT_B_16_Weights.IMAGENET1K_V1", "encoder.layers.encoder_layer_11.ln_1", tokens=True, input_size=224))
register(BackboneSpec("tiny", 16, "global average pool (test model)", Normalization(), TinyCNN,
                      lambda m: nn.Sequential(m.features, m.pool), "head", "features.2", for_tests=True))
