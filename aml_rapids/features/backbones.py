"""One registry of networks, timm-style: a name gives the network, its feature layer and dimension, its
classification head, its last block, its input normalisation and where its published weights come from, so that
extraction, fine-tuning and explanation treat every network alike.

Each network is built whole (so any state_dict of the full model loads, a fine-tuned one with its new head
included) and then truncated; the result is an ordinary differentiable ``nn.Module`` mapping NCHW images to
(N, dim). The head reads the feature layer's output (through the network's own dropout or ReLU), so fine-tuning
the whole network trains the features the hybrid classifier then reads. The torchvision networks are registered
here; ``timm:NAME`` entries and the hematology presets are made on first request (``timm_backbones``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision import models
from torchvision.models import get_weight

from ..errors import ConfigError
from ..loader.pipeline import Normalization


@dataclass(frozen=True)
class Published:
    """A network's published weights: what they are, and the file on the web or the hub repository they are
    downloaded from (``published.py`` says where this machine keeps them)."""

    words: str  # what they were trained on, by whom
    url: str | None = None  # a file, cached in torch's hub cache under its name
    hf_repo: str | None = None  # a Hugging Face hub repository, cached in the Hugging Face cache
    hf_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    hash_in_name: bool = False  # torchvision's: the file name carries the first hex digits of its sha256


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    dim: int
    layer: str
    normalization: Normalization
    build: Callable[[], nn.Module]
    truncate: Callable[[nn.Module], nn.Module]
    head: str | None  # the classification layer (an nn.Linear), a dotted module path; None: it has none
    last_block: str | None  # the last block (Grad-CAM's layer; ``unfreeze: last_block``); None: not known
    published: Published | None = None  # the weights ``weights: imagenet`` (or ``pretrained``) loads
    cam_layer: str | None = None  # Grad-CAM's layer where it is not ``last_block``'s output (see ``gradcam_layer``)
    tokens: int | None = None  # the Grad-CAM layer outputs tokens (N, tokens + patches, C): this many before a grid
    nhwc: bool = False  # the Grad-CAM layer outputs (N, H, W, C) maps (a Swin's stages)
    input_size: int | None = None  # the one image size the network takes, if it has one (a ViT's patch grid)
    for_tests: bool = False  # a network for tests and smoke runs: accepted by name, never listed to users
    reset: Callable[[nn.Module, int], object] | None = None  # the network's own head replacement (timm's)
    adapt_state: Callable[[dict, nn.Module], dict] | None = None  # maps a release's key names onto the network's
    hub_config: bool = False  # built from a hub repository's config.json, which ``weights fetch`` fetches too

    @property
    def gradcam_layer(self) -> str:
        """Where Grad-CAM reads activations and gradients. A ViT's last block's output reaches the class token
        only through the final norm, which reads the class token alone, so its patch tokens get no gradient;
        its last block's first norm still feeds them into the class token through attention."""
        return self.cam_layer or self.last_block

    def check_input(self, image_size: int) -> None:
        """Refuse an image size the network cannot take (a ViT with a fixed patch grid)."""
        if self.input_size not in (None, image_size):
            raise ConfigError(f"{self.name} takes {self.input_size}x{self.input_size} images only; set "
                              f"loader.image_size={self.input_size} (it is {image_size})")

    def classes_of(self, state: dict) -> int:
        """How many classes the head of a state_dict of this network predicts."""
        return int(state[f"{self.head}.weight"].shape[0])

    def head_width(self, model: nn.Module) -> int:
        """How many classes ``model``'s head predicts; 0 where it has none (a hub encoder built headless)."""
        head = model.get_submodule(self.head) if self.head else None
        return head.out_features if isinstance(head, nn.Linear) else 0

    def reset_head(self, model: nn.Module, num_classes: int) -> nn.Module:
        """``model`` with a new, freshly initialised head for ``num_classes`` (the published one replaced)."""
        if self.reset is not None and self.head:
            self.reset(model, num_classes)
            return model
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
    """The registry entry of ``name``; a ``timm:`` name or a preset is made (and registered) on first request."""
    if name in REGISTRY:
        return REGISTRY[name]
    from . import timm_backbones

    if timm_backbones.is_timm(name):
        return register(timm_backbones.make_spec(name))
    known = ", ".join(s.name for s in public_specs())
    raise ConfigError(f"unknown backbone {name!r}; known: {known}, any timm model as timm:NAME, and the presets "
                      f"{', '.join(timm_backbones.PRESETS)} (`aml-rapids backbones` lists them)") from None


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


def _torchvision(weights: str) -> Published:
    return Published(f"ImageNet-1k (torchvision {weights})", url=get_weight(weights).url, hash_in_name=True)


register(BackboneSpec(
    "mobilenet_v2", 1280, "global average pool after features", Normalization(),
    models.mobilenet_v2, lambda m: _global_pool(m.features), "classifier.1", "features.18",
    _torchvision("MobileNet_V2_Weights.IMAGENET1K_V1")))
register(BackboneSpec(
    "resnet101", 2048, "pool5 (global average pool)", Normalization(),
    models.resnet101, lambda m: nn.Sequential(*list(m.children())[:-1], nn.Flatten()), "fc", "layer4",
    _torchvision("ResNet101_Weights.IMAGENET1K_V1")))
register(BackboneSpec(
    "vgg16", 4096, "fc7 (before its ReLU, as MATLAB's activations('fc7'))", Normalization(),
    models.vgg16, lambda m: nn.Sequential(m.features, m.avgpool, nn.Flatten(), *list(m.classifier)[:4]),
    "classifier.6", "features.28", _torchvision("VGG16_Weights.IMAGENET1K_V1")))
register(BackboneSpec(
    "vit_b_16", 768, "class token after the encoder (classification head removed)", Normalization(),
    models.vit_b_16, _without_head, "heads.head", "encoder.layers.encoder_layer_11",
    _torchvision("ViT_B_16_Weights.IMAGENET1K_V1"), "encoder.layers.encoder_layer_11.ln_1", tokens=1,
    input_size=224))
register(BackboneSpec("tiny", 16, "global average pool (test model)", Normalization(), TinyCNN,
                      lambda m: nn.Sequential(m.features, m.pool), "head", "features.2", for_tests=True))
