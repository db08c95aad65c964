"""What a fine-tuning folder says of its weights: ``finetune.json`` (the run: manifest, split, base weights,
progress) and ``seen_cells.csv`` (the SHA-256 of the file and of the decoded pixels of every cell it trained or
validated on).

Any weights file in that folder (``best.pt``, ``checkpoint.pt``) was made from those cells, so whoever loads it
learns which cells its features have seen: extraction marks them in the store (by file or pixel content, as the
classifier's own check matches), and evaluation refuses them. Both files are written before the first step, so
no weights file is ever without them. A fine-tuned network found outside such a folder is named as fine-tuned on
unknown cells.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import DataError
from ..outputs import atomic_write_text, file_sha256, read_json

FINETUNE_JSON = "finetune.json"
SEEN_CELLS = "seen_cells.csv"
RECORD_KEYS = ("backbone", "base_weights", "manifest", "split", "classes", "best", "seen_cells")  # what it is read for


@dataclass(frozen=True)
class FinetuneRecord:
    """Where fine-tuned weights came from (``about``, as finetune.json says it) and the cells they saw."""

    about: dict
    seen: frozenset[str]  # file SHA-256 and pixel SHA-256 of every cell it trained or validated on

    def words(self) -> str:
        """"fine-tuned on <source>, <split> split (train)" for reports and plot titles."""
        if self.about.get("unknown"):
            return "fine-tuned on unknown cells (no finetune.json beside the weights)"
        split = self.about.get("split") or {}
        return (f"fine-tuned on {self.about['manifest']['source']}, {split.get('method', '?')} split seed "
                f"{split.get('seed', '?')} (train; val picked the best step)")

    def provenance(self) -> dict:
        """What a store and a report keep of the fine-tuning (the cell list stays in its folder): only what is
        fixed once the weights are, so re-running a finished fine-tuning leaves stores made from it valid."""
        if self.about.get("unknown"):
            return {"words": self.words(), "seen_cells": None}
        base = self.about["base_weights"]
        return {"backbone": self.about["backbone"], "base_weights": {k: base[k] for k in ("sha256", "pretrained")},
                "manifest": {k: self.about["manifest"][k] for k in ("digest", "source")},
                "split": self.about["split"], "classes": self.about["classes"], "best": self.about["best"],
                "seen_cells": self.about["seen_cells"]["cells"], "seen_cells_sha256": self.about["seen_cells"]["sha256"],
                "words": self.words()}


UNKNOWN = FinetuneRecord({"unknown": True}, frozenset())


def write_seen_cells(folder: Path, table: pd.DataFrame) -> dict:
    """Write the training and validation cells' hashes; returns the record finetune.json keeps of the file."""
    pixels = table["pixels_sha256"].fillna("") if "pixels_sha256" in table else ""
    seen = table.assign(pixels_sha256=pixels)[["sha256", "pixels_sha256", "split"]].drop_duplicates("sha256")
    path = atomic_write_text(Path(folder) / SEEN_CELLS, seen.sort_values("sha256").to_csv(index=False))
    return {"file": SEEN_CELLS, "cells": len(seen), "sha256": file_sha256(path)}


def write_about(folder: Path, about: dict) -> None:
    atomic_write_text(Path(folder) / FINETUNE_JSON, json.dumps(about, indent=2))


def read_record(weights: Path) -> FinetuneRecord | None:
    """The record of the fine-tuning folder ``weights`` lies in, or None if it lies in none."""
    folder = Path(weights).parent
    if not (folder / FINETUNE_JSON).is_file():
        return None
    about = read_json(folder / FINETUNE_JSON)
    missing = [key for key in RECORD_KEYS if not isinstance(about, dict) or key not in about]
    if missing:
        raise DataError(f"{folder / FINETUNE_JSON} is not a fine-tuning record (it lacks {', '.join(missing)}): "
                        f"which cells weights {weights} were fine-tuned on cannot be told; fine-tune again")
    seen_file = folder / about["seen_cells"]["file"]
    if not seen_file.is_file() or file_sha256(seen_file) != about["seen_cells"]["sha256"]:
        raise DataError(f"{seen_file} is missing or is not the cell list {folder / FINETUNE_JSON} records: which "
                        f"cells weights {weights} were fine-tuned on cannot be told; fine-tune again")
    cells = pd.read_csv(seen_file, dtype=str, keep_default_na=False)
    pixels = frozenset(cells["pixels_sha256"]) - {""} if "pixels_sha256" in cells else frozenset()  # older lists: file hashes only
    return FinetuneRecord(about, frozenset(cells["sha256"]) | pixels)
