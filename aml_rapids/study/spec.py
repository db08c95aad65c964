"""A study file: one base config and named variants, each a set of config overrides, compared on the same cells.

Variants are written out one by one, or made from three patterns that cover the usual designs:

- ``grid``: every combination of a few keys' values;
- ``cumulative``: each step adds its overrides to all the steps before it (the paper's ablation chain);
- ``leave_one_out``: one named variant minus one part at a time (each part a set of overrides).
A variant with ``head: true`` is the network its ``finetune`` section fine-tunes, judged by its own new head on the
test split (the paper's fine-tuned networks), beside variants of features and the classifier.

Every variant is checked against the config model before anything runs, so a misspelt key stops the study at
once. Variants may not touch how cells are indexed or split: their comparison is paired, on identical cells.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import RunConfig, as_overrides, load_config, validation_problems
from ..errors import ConfigError

Overrides = dict[str, Any]  # dotted config key -> value, e.g. {"segmentation.enabled": false}
SHARED_SECTIONS = ("index", "split")  # what every variant shares, so that all are tested on the same cells


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Variant(_Strict):
    name: str = Field(min_length=1)
    set: Overrides = Field(default_factory=dict, description="config overrides of this variant")
    head: bool = Field(False, description="the network fine-tuned by the finetune section, its own head on the test "
                                          "split, instead of extracted features and the classifier")


class LeaveOneOut(_Strict):
    of: str = Field(description="the variant that parts are left out of, one at a time")
    parts: dict[str, Overrides] = Field(description="part name -> the overrides that leave it out")


class StudySpec(_Strict):
    """What ``aml-rapids study`` reads from a YAML file."""

    name: str = Field(min_length=1)
    description: str = ""
    config: Optional[Path] = Field(None, description="base YAML config (relative to the study file); none: built-in")
    set: Overrides = Field(default_factory=dict, description="overrides of the base config, for every variant")
    reference: str = Field(description="the variant every other is compared with (McNemar's test)")
    variants: list[Variant] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="key -> values: one variant per combination")
    cumulative: list[Variant] = Field(default_factory=list, description="steps, each adding to those before it")
    leave_one_out: Optional[LeaveOneOut] = None

    @model_validator(mode="after")
    def _names(self) -> "StudySpec":
        names = [v.name for v in self.expand()]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ValueError(f"variant names must be unique; given twice: {', '.join(doubled)}")
        if self.reference not in names:
            raise ValueError(f"reference {self.reference!r} is not a variant (variants: {', '.join(names)})")
        return self

    def expand(self) -> list[Variant]:
        """Every variant, patterns written out, in order: listed, grid, cumulative, leave-one-out."""
        out = list(self.variants)
        keys = list(self.grid)
        for values in itertools.product(*(self.grid[k] for k in keys)) if keys else ():
            combination = dict(zip(keys, values))
            out.append(Variant(name=", ".join(as_overrides(combination)), set=combination))
        chain: Overrides = {}
        for step in self.cumulative:
            chain = {**chain, **step.set}
            out.append(Variant(name=step.name, set=dict(chain)))
        if self.leave_one_out is not None:
            base = next((v for v in out if v.name == self.leave_one_out.of), None)
            if base is None:
                raise ValueError(f"leave_one_out.of {self.leave_one_out.of!r} is not a variant")
            for part, overrides in self.leave_one_out.parts.items():
                out.append(Variant(name=f"{base.name} - {part}", set={**base.set, **overrides}))
        return out


def read_spec(path: Path) -> StudySpec:
    """A study file, validated; errors name the file and the problem."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"study file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"study file {path} cannot be read: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"study file {path} must hold a mapping (name, reference, variants, ...)")
    try:
        spec = StudySpec.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"study file {path}: {validation_problems(exc)}") from None
    if spec.config is not None and not spec.config.is_absolute():
        spec.config = path.parent / spec.config
    return spec


def variant_config(spec: StudySpec, variant: Variant, extra: list[str] | None = None) -> RunConfig:
    """The base config, the study's overrides, ``extra`` (e.g. the command line's --set) and the variant's."""
    shared = sorted(k for k in variant.set if k.split(".")[0] in SHARED_SECTIONS)
    if shared:
        raise ConfigError(f"variant {variant.name!r} overrides {', '.join(shared)}: variants share how cells are "
                          "indexed and split (set it for the whole study), so that they are compared on the "
                          "same cells")
    try:
        return load_config(spec.config, as_overrides(spec.set) + list(extra or []) + as_overrides(variant.set))
    except ConfigError as exc:
        raise ConfigError(f"variant {variant.name!r}: {exc}") from None
