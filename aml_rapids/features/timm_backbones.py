"""Registry entries made from timm: ``timm:NAME`` for any model timm builds (``timm:convnext_tiny``, a pretrained
tag as ``timm:convnext_tiny.fb_in22k``, a Hugging Face hub model as ``timm:hf-hub:ORG/REPO``), and named presets
for hematology (DinoBloom), made on first request.

What an entry needs is read off the model itself, built on the meta device (no memory, no initialisation): its
feature size (``head_hidden_size``), its head (``pretrained_cfg['classifier']``, replaced by timm's own
``reset_classifier``), its last block (``feature_info``), whether it takes one image size only (a ViT's strict
patch embedding) and, from its pretrained config, its input normalisation and where its weights are published.
Features are timm's own pre-logits: ``forward_head(forward_features(x), pre_logits=True)``. The loader's own
resize (to ``loader.image_size``, after segmentation) replaces timm's crop and interpolation settings.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, WeightsError
from ..loader.pipeline import Normalization
from .backbones import BackboneSpec, Published

PREFIX = "timm:"
HUB = "hf-hub:"
DINOBLOOM = ("Koch V, Wagner SJ, Kazeminia S, et al. DinoBloom: a foundation model for generalizable cell "
             "embeddings in hematology. MICCAI 2024; arXiv:2404.05022. Weights: zenodo.org/records/10908163")


@dataclass(frozen=True)
class Preset:
    """A named encoder: its timm architecture and arguments, its input normalisation and its authors' weights,
    so that it builds offline with no hub config."""

    architecture: str
    model_args: dict = field(default_factory=dict)
    published: Published | None = None
    normalization: Normalization = Normalization()
    citation: str = ""


def _dinobloom(size: str, architecture: str) -> Preset:
    return Preset(architecture, {"img_size": 224, "num_classes": 0},
                  Published(f"DinoBloom-{size} (DINOv2 trained on blood and bone-marrow cells, Koch et al. 2024)",
                            url=f"https://zenodo.org/records/10908163/files/DinoBloom-{size}.pth?download=1"),
                  Normalization(), DINOBLOOM)


PRESETS: dict[str, Preset] = {
    "dinobloom_s": _dinobloom("S", "vit_small_patch14_dinov2"),
    "dinobloom_b": _dinobloom("B", "vit_base_patch14_dinov2"),
    "dinobloom_l": _dinobloom("L", "vit_large_patch14_dinov2"),
}


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX) or name in PRESETS


def make_spec(name: str) -> BackboneSpec:
    """The registry entry of a ``timm:`` name or a preset; a clear error for a name timm does not know, a hub
    model whose config is not on this machine, or an input size the loader cannot give."""
    import timm

    preset = PRESETS.get(name)
    if preset is not None:
        architecture, args, overlay = preset.architecture, dict(preset.model_args), None
    elif name[len(PREFIX):].startswith(HUB):
        architecture, args, overlay = _hub_config(name, hub_repo(name))
    else:
        architecture, args, overlay = _checked_name(name, name[len(PREFIX):]), {}, None

    def build() -> nn.Module:
        return timm.create_model(architecture, pretrained=False, pretrained_cfg=overlay, **args)

    try:
        with torch.device("meta"):
            model = build()
        cfg = model.pretrained_cfg
        normalization = preset.normalization if preset else Normalization(*(_triple(cfg, k) for k in ("mean", "std")))
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as exc:
        if overlay is None:
            raise
        raise WeightsError(f"backbone {name!r}: its hub config does not build a timm model ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    last = _last_block(model)
    tokens = getattr(model, "num_prefix_tokens", None) if hasattr(model, "blocks") else None
    cam = f"{last}.norm1" if last and tokens is not None and _has(model, f"{last}.norm1") else None
    default = timm.models.get_pretrained_cfg(architecture.partition(".")[0])  # a hub config may not name the head
    return BackboneSpec(
        name, int(getattr(model, "head_hidden_size", None) or model.num_features), _layer_words(model),
        normalization, build, TimmFeatures, cfg.get("classifier") or (default and default.classifier), last,
        preset.published if preset else _published(cfg, name),
        cam, tokens if cam else None, getattr(model, "output_fmt", "NCHW") == "NHWC", _input_size(name, model),
        reset=lambda m, n: m.reset_classifier(n),
        adapt_state=getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None),
        hub_config=overlay is not None)


class TimmFeatures(nn.Module):
    """A timm model's pre-logits features, by timm's own API: ``forward_features`` then ``forward_head``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


def _checked_name(name: str, model_name: str) -> str:
    import timm

    architecture, _, tag = model_name.partition(".")
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=5, cutoff=0.6)
        raise ConfigError(f"timm has no model {architecture!r} (backbone {name!r})"
                          + (f"; close names: {', '.join(close)}" if close else "")
                          + " (timm.list_models() lists them)")
    if tag and model_name not in timm.list_pretrained(f"{architecture}.*"):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{architecture}.*")]
        raise ConfigError(f"timm model {architecture} has no pretrained tag {tag!r} (backbone {name!r}); its tags: "
                          f"{', '.join(tags) or 'none'}")
    return model_name


def hub_repo(name: str) -> str:
    """The hub repository of a ``timm:hf-hub:ORG/REPO`` name, checked to be one."""
    repo = name[len(PREFIX) + len(HUB):]
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo) or ".." in repo:
        raise ConfigError(f"backbone {name!r}: {repo!r} is not a hub repository id; write timm:hf-hub:ORG/REPO")
    return repo


def _hub_config(name: str, repo: str) -> tuple[str, dict, dict]:
    """A hub model's architecture, model arguments and pretrained config, from its config.json in the Hugging Face
    cache (read as timm reads it; never downloaded here: ``aml-rapids weights fetch`` does that)."""
    from .published import hf_cache, hf_cached

    path = hf_cached(repo, "config.json")
    if path is None:
        raise WeightsError(f"backbone {name!r}: the hub model's config.json is not in the Hugging Face cache "
                           f"({hf_cache()}), and nothing is downloaded here; run `aml-rapids weights fetch {name}` on "
                           "a machine with internet (with --to DIR to copy it here; set HF_HOME)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"backbone {name!r}: cannot read its hub config {path}: {exc}") from None
    if not isinstance(config, dict):
        config = {}
    if "pretrained_cfg" not in config and "architecture" in config:  # the older, flat form timm still reads
        config = {"architecture": config.pop("architecture"), "pretrained_cfg": config}
    if not isinstance(config.get("pretrained_cfg"), dict) or not isinstance(config.get("architecture"), str):
        raise WeightsError(f"backbone {name!r}: hub config {path} is not a timm model config (it has no "
                           "'architecture' and 'pretrained_cfg'), so its network, input size and normalisation are "
                           "unknown; a timm model on the hub needs both")
    pretrained = {**config["pretrained_cfg"], "hf_hub_id": repo, "source": "hf-hub"}
    if "num_classes" in config:
        pretrained["num_classes"] = config["num_classes"]
    args = config.get("model_args") or {}
    if not isinstance(args, dict):
        raise WeightsError(f"backbone {name!r}: hub config {path} has model_args {args!r}, not a mapping of "
                           "arguments")
    return config["architecture"], dict(args), pretrained


def _published(cfg: dict, name: str) -> Published | None:
    if cfg.get("hf_hub_id"):
        files = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else Published.hf_files
        return Published(f"timm pretrained {cfg.get('architecture', name)}.{cfg.get('tag') or ''}".rstrip("."),
                         hf_repo=cfg["hf_hub_id"], hf_files=files)
    if cfg.get("url"):
        return Published(f"timm pretrained {cfg.get('architecture', name)}", url=cfg["url"])
    return None


def _last_block(model: nn.Module) -> str | None:
    """The module of the model's last ``feature_info`` entry; None where it declares none or names a module the
    model does not have (Grad-CAM and ``unfreeze: last_block`` then say so; features need no last block)."""
    info = getattr(model, "feature_info", None)
    last = info[-1].get("module") if info and isinstance(info[-1], dict) else None
    return last if last and _has(model, last) else None


def _triple(cfg: dict, key: str) -> tuple[float, float, float]:
    value = cfg.get(key)
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
        raise ValueError(f"pretrained_cfg {key} is {value!r}, not three numbers (one per RGB channel)")
    return tuple(float(v) for v in value)


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _input_size(name: str, model: nn.Module) -> int | None:
    """The one image size the model takes (a patch embedding that is strict about it), or None: any size."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None and hasattr(embed, "strict_img_size"):
        size = tuple(embed.img_size) if embed.strict_img_size and not getattr(model, "dynamic_img_size", False) else None
    else:
        cfg = model.pretrained_cfg
        size = tuple(cfg["input_size"][1:]) if cfg.get("fixed_input_size") else None
    if size is not None and size[0] != size[1]:
        raise ConfigError(f"backbone {name!r} takes {size[0]}x{size[1]} images only, and the loader resizes every "
                          "cell to a square (loader.image_size); choose a model with a square input")
    return size and int(size[0])


def _layer_words(model: nn.Module) -> str:
    pool = getattr(model, "global_pool", None) or getattr(getattr(model, "head", None), "global_pool", None)
    pool = getattr(pool, "pool_type", pool)  # a CNN's SelectAdaptivePool2d
    if pool == "token":
        return "timm pre-logits: class token after the final norm"
    return f"timm pre-logits: {pool or 'the head'} pooling of the last stage"
