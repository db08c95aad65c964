"""Procedurally drawn, clearly synthetic 144x144 cells in the target dataset's layout, for offline demos and tests.

Each class gets its own morphology (nucleus size and lobes, granules, rods, cytoplasm tint) so a classifier has
something to learn; each patient gets its own stain tint, as real smears do. Nothing here is real data.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 144
TIFF_DESCRIPTION = 270  # TIFF ImageDescription tag
SYNTHETIC_NOTE = "aml-rapids synthetic demo cell: procedurally drawn, not a real blood smear"


@dataclass(frozen=True)
class Morphology:
    cell_radius: tuple[int, int]
    nucleus_ratio: float
    lobes: tuple[int, int]
    granules: int
    granule_rgb: tuple[int, int, int]
    rods: int
    cytoplasm_rgb: tuple[int, int, int]
    cup: bool = False
    nucleolus: bool = False


# Class names as in the target dataset (AML-Cytomorphology_MLL_Helmholtz).
CLASSES: dict[str, Morphology] = {
    "control": Morphology((22, 28), 0.45, (3, 4), 25, (200, 150, 190), 0, (210, 175, 228)),
    "PML_RARA": Morphology((32, 40), 0.55, (2, 2), 160, (120, 40, 110), 2, (212, 160, 215)),
    "NPM1": Morphology((28, 36), 0.70, (1, 1), 0, (0, 0, 0), 0, (170, 160, 228), cup=True),
    "CBFB_MYH11": Morphology((30, 38), 0.60, (2, 3), 60, (235, 120, 70), 0, (190, 168, 228)),
    "RUNX1_RUNX1T1": Morphology((30, 36), 0.75, (1, 1), 10, (140, 60, 140), 1, (160, 170, 220), nucleolus=True),
}


def _ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill) -> None:
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)


def draw_cell(morph: Morphology, rng: np.random.Generator, tint: np.ndarray) -> Image.Image:
    """One cell on a pink smear background with a few red blood cells around it."""
    background = np.array([240, 218, 208]) + tint * 0.2
    img = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(2, 6)):
        x, y, r = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(14, 20)
        _ellipse(draw, x, y, r, r * rng.uniform(0.85, 1.0), (214, 140, 150))
        _ellipse(draw, x, y, r * 0.45, r * 0.4, (226, 172, 180))
    cx, cy = SIZE / 2 + rng.normal(0, 4, 2)
    radius = rng.uniform(*morph.cell_radius)
    _ellipse(draw, cx, cy, radius, radius * rng.uniform(0.85, 1.0), tuple(int(v) for v in morph.cytoplasm_rgb + tint))
    for _ in range(morph.granules):
        a, d = rng.uniform(0, 2 * np.pi), radius * np.sqrt(rng.uniform(0, 0.9))
        _ellipse(draw, cx + d * np.cos(a), cy + d * np.sin(a), 1.3, 1.3, morph.granule_rgb)
    nucleus = tuple(int(v) for v in np.clip(np.array([105, 55, 145]) + tint, 0, 255))
    lobes = rng.integers(morph.lobes[0], morph.lobes[1] + 1)
    r_nuc = radius * morph.nucleus_ratio / (1 + 0.35 * (lobes - 1))
    for k in range(lobes):
        a = 2 * np.pi * k / lobes + rng.uniform(0, np.pi)
        off = 0 if lobes == 1 else r_nuc * 0.9
        _ellipse(draw, cx + off * np.cos(a), cy + off * np.sin(a), r_nuc, r_nuc * rng.uniform(0.75, 1.0), nucleus)
    if morph.cup:
        _ellipse(draw, cx + r_nuc * 0.5, cy, r_nuc * 0.35, r_nuc * 0.3, tuple(int(v) for v in morph.cytoplasm_rgb))
    if morph.nucleolus:
        _ellipse(draw, cx - r_nuc * 0.3, cy - r_nuc * 0.2, r_nuc * 0.22, r_nuc * 0.22, (150, 110, 185))
    for _ in range(morph.rods):
        a, d = rng.uniform(0, 2 * np.pi), radius * 0.75
        x, y = cx + d * np.cos(a), cy + d * np.sin(a)
        b = rng.uniform(0, np.pi)
        draw.line([x - 7 * np.cos(b), y - 7 * np.sin(b), x + 7 * np.cos(b), y + 7 * np.sin(b)], fill=(90, 20, 80), width=2)
    img = img.filter(ImageFilter.GaussianBlur(0.8))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 3, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _write_patient(out: Path, c: int, p: int, cells: int, seed: int) -> int:
    """One patient's cells, from its own random stream: patients can be drawn in any order or in parallel."""
    name, morph = list(CLASSES.items())[c]
    patient_dir = out / name / f"synthetic_{name}_{p:02d}"
    patient_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, c, p])
    tint = rng.normal(0, 10, 3)
    for i in range(cells):
        draw_cell(morph, rng, tint).save(patient_dir / f"cell_{i:04d}.tif", format="TIFF",
                                         tiffinfo={TIFF_DESCRIPTION: SYNTHETIC_NOTE})
    return cells


def is_demo_folder(path: Path) -> bool:
    """Whether ``path`` holds a demo set (its README says so): the one kind of non-empty folder demo-data
    draws into, since it would mix synthetic cells into real ones and replace a README."""
    readme = Path(path) / "README.txt"
    return readme.is_file() and readme.read_text(errors="replace").startswith(SYNTHETIC_NOTE)


def write_demo_dataset(out: Path, patients_per_class: int = 4, cells_per_patient: int = 30, seed: int = 0,
                       progress=None, workers: int = 1) -> int:
    """Write ``<class>/<patient>/<image>.tif`` under ``out`` and a README that says it is synthetic; ``workers``
    processes draw patients in parallel (the full-size benchmark set has 81,250 cells)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.txt").write_text(SYNTHETIC_NOTE + f".\nDrawn by `aml-rapids demo-data` with seed {seed}.\n")
    jobs = [(out, c, p, cells_per_patient, seed) for c in range(len(CLASSES)) for p in range(patients_per_class)]
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        done = pool.map(_write_patient, *zip(*jobs)) if pool else (_write_patient(*job) for job in jobs)
        written = 0
        for n in done:
            written += n
            if progress:
                progress(n)
    return written
