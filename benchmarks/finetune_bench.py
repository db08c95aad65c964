"""Fine-tuning stage: training images/s of the aml-rapids loop against the field's usual torchvision loop, same
cells, same network, same run.

The naive loop is PIL + torchvision transforms (the method's HSV mask, random affine, flips, resize, normalise) in a
shuffled DataLoader, fp32, batch 32, contiguous memory. aml-rapids trains through its own loop (``finetune.loop``):
DALI in training mode (augmentation drawn per cell and epoch), channels_last, in fp32 and in bf16 autocast, each
timed; ``finetune.precision: auto`` picks between them on a CPU by the probe that is also timed here. Each variant
trains a fresh network for ``images`` cells of the train split (whole batches), from random weights (speed does not
depend on the weights).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from aml_rapids.config import load_config
from aml_rapids.data.manifest import Manifest
from aml_rapids.finetune.loop import train_one_epoch
from aml_rapids.finetune.task import choose_precision, loss_function, make_task
from aml_rapids.finetune.data import epoch_table
from aml_rapids.loader.loader import CellLoader, resolve_device
from aml_rapids.provenance import usable_cores

from .harness import Variant, head, throughputs
from .loader_bench import NaiveCells


def _labels(manifest: Manifest) -> tuple[np.ndarray, list[str]]:
    classes = sorted(manifest.table["label"].unique())
    return manifest.table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64), classes


def naive_loop(manifest: Manifest, cfg, backbone: str, device: str) -> int:
    """The usual torchvision fine-tuning loop: shuffled PIL DataLoader, fp32, batch 32."""
    labels, classes = _labels(manifest)
    task = make_task(cfg.finetune.model_copy(update={"backbone": backbone, "weights": "none"}), classes, device, False)
    optimizer, loss_fn = torch.optim.Adam(task.model.parameters(), lr=1e-4), torch.nn.CrossEntropyLoss()
    data = NaiveCells(manifest.paths(), True, cfg.segmentation, cfg.loader.image_size)
    seen = 0
    task.model.train()
    for images, index in DataLoader(data, batch_size=32, shuffle=True, num_workers=usable_cores()):
        logits = task.model(images.to(device))
        loss = loss_fn(logits, torch.from_numpy(labels[index.numpy()]).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(index)
    return seen


def aml_loop(manifest: Manifest, cfg, backbone: str, device: str, precision: str) -> int:
    """aml-rapids' loop for one epoch over ``manifest``: DALI training loader, channels_last, ``precision``."""
    labels, classes = _labels(manifest)
    ft = cfg.finetune.model_copy(update={"backbone": backbone, "weights": "none"})
    task = make_task(ft, classes, device, True)
    task.precision = precision
    optimizer = torch.optim.Adam(task.model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    table = epoch_table(manifest.table.assign(aug_index=0), 0, 0)
    loader = CellLoader(table, manifest.root, cfg, augment=True, normalizations={backbone: task.spec.normalization},
                        epoch=0)
    order_labels = table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    task.model.train()
    return sum(r.rows for r in train_one_epoch(task, loader, order_labels, optimizer, scheduler, loss_function(ft),
                                               0, 0))


def run(manifest: Manifest, images: int, repeats: int, backbone: str, device: str) -> list[dict]:
    cells = head(manifest, images - images % 32 or 32)
    cfg = load_config(None, [f"loader.device={device}", "loader.batch_size=32"])
    torch_device = "cuda" if resolve_device(device) == "gpu" else "cpu"
    if torch_device == "cpu":
        torch.set_num_threads(usable_cores())
    warm = head(cells, 64)
    variants = {
        "naive (PIL+torchvision DataLoader, fp32, batch 32)": lambda m: naive_loop(m, cfg, backbone, torch_device),
        "aml-rapids loop fp32 (DALI, channels_last)": lambda m: aml_loop(m, cfg, backbone, torch_device, "fp32"),
        "aml-rapids loop bf16 autocast": lambda m: aml_loop(m, cfg, backbone, torch_device, "bf16"),
    }
    timings = throughputs({name: Variant(lambda f=f: f(cells), lambda f=f: f(warm)) for name, f in variants.items()},
                          repeats)
    ft = cfg.finetune.model_copy(update={"backbone": backbone, "weights": "none"})
    task = make_task(ft, ["a", "b"], torch_device, True)
    start = time.perf_counter()
    choose_precision(task, ft, cfg.loader.image_size)  # what finetune.precision: auto does on this machine
    choice = {"chosen": task.precision, "probe_images_per_s": task.measured or None,
              "probe_seconds": time.perf_counter() - start}
    naive = timings[next(iter(variants))]["items_per_s"]
    return [{"variant": name, **timing, "x_naive": timing["items_per_s"] / naive, "backbone": backbone,
             "auto_choice": choice} for name, timing in timings.items()]
