"""Stain normalisation and colour / stain jitter in the DALI graph: parity with scikit-image on real cells (on
drawn ones where ../shared is absent), draws that follow the row, training only, and the reference's checks."""

from pathlib import Path

import numpy as np
import nvidia.dali.fn as fn
import pandas as pd
import pytest
from nvidia.dali import pipeline_def
from PIL import Image
from skimage.color import hed2rgb, lab2rgb, rgb2hed, rgb2lab

from aml_rapids.config import AugmentConfig, RunConfig, SegmentationConfig, load_config
from aml_rapids.data.manifest import build_manifest
from aml_rapids.errors import DataError
from aml_rapids.loader import stain
from aml_rapids.loader.augment import affine_matrices, colour_factors, row_draws, stain_draws, stain_transforms
from aml_rapids.loader.hsv import hsv_mask
from aml_rapids.loader.loader import CellLoader, stain_target

from conftest import SHARED_DATA, write_image


def cells(count: int = 6) -> list[np.ndarray]:
    """Real PBC cells when ../shared is there (one of each of several types), else drawn blobs on a smear."""
    files = sorted((SHARED_DATA / "pbc144").glob("*/*.jpg"))[::2500][:count]
    if files:
        return [np.asarray(Image.open(f).convert("RGB")) for f in files]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        img = np.full((48, 48, 3), (235, 215, 200), np.uint8) + rng.integers(0, 20, (48, 48, 3), dtype=np.uint8)
        img[14:34, 12:36] = (110, 60, 160) + rng.integers(0, 40, (20, 24, 3))
        out.append(img)
    return out


def run_graph(images: list[np.ndarray], body, *per_sample: np.ndarray):
    """Outputs of ``body(images, mask, *per_sample nodes)`` on DALI's CPU, one list of arrays per output."""

    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        inputs = [fn.external_source(source=[[np.ascontiguousarray(a) for a in values]], cycle=True, batch=True)
                  for values in per_sample]
        return body(x, hsv_mask(x, SegmentationConfig()), *inputs)

    p = pipe()
    p.build()
    return [[np.array(t) for t in out] for out in p.run()]


def test_lab_conversions_match_scikit_image():
    images = cells()
    lab, back = run_graph(images, lambda x, m: (stain.rgb_to_lab(x / 255.0), stain.lab_to_rgb(stain.rgb_to_lab(x / 255.0))))
    for img, ours, rgb in zip(images, lab, back):
        assert np.abs(ours - rgb2lab(img / 255.0)).max() < 2e-3
        assert np.abs(rgb * 255 - img).max() < 0.05


@pytest.mark.parametrize("region", ["cell", "image"])
def test_reinhard_matches_scikit_image_within_one_grey_level(region):
    images = cells()
    target = stain.LabTarget((62.0, 18.0, -22.0), (14.0, 7.0, 9.0), region, "sha")
    out, masks = run_graph(images, lambda x, m: (stain.reinhard(x, m if region == "cell" else x[:, :, 0:1] * 0 + 1,
                                                                target), m))
    for img, ours, mask in zip(images, out, masks):
        keep = mask[..., 0].astype(bool) if region == "cell" else np.ones(img.shape[:2], bool)
        lab = rgb2lab(img / 255.0)
        mean, std = lab[keep].mean(0), lab[keep].std(0)
        moved = (lab - mean) / np.maximum(std, stain.STD_FLOOR) * target.std + target.mean
        want = np.clip(np.round(lab2rgb(moved) * 255), 0, 255)
        assert ours.dtype == np.uint8 and np.abs(ours.astype(int) - want).max() <= 1
        moved_back = rgb2lab(ours[keep].reshape(-1, 1, 3) / 255.0).reshape(-1, 3)
        assert np.allclose(moved_back.mean(0), target.mean, atol=3.0)  # lab2rgb's gamut clip moves it a little


def test_hed_jitter_matches_scikit_image_within_one_grey_level():
    images = cells()
    rng = np.random.default_rng(1)
    alpha, beta = 1 + 0.1 * (2 * rng.random((len(images), 3)) - 1), 0.02 * (2 * rng.random((len(images), 3)) - 1)
    (out,) = run_graph(images, lambda x, m, mats, shifts: (stain.stain_jitter(x, mats, shifts),),
                       *stain_transforms(alpha, beta))
    for img, ours, a, b in zip(images, out, alpha, beta):
        want = np.clip(np.round(hed2rgb(rgb2hed(img) * a + b) * 255), 0, 255)
        assert np.abs(ours.astype(int) - want).max() <= 1
    (same,) = run_graph(images, lambda x, m, mats, shifts: (stain.stain_jitter(x, mats, shifts),),
                        *stain_transforms(np.ones((len(images), 3)), np.zeros((len(images), 3))))
    assert max(np.abs(s.astype(int) - np.clip(np.round(hed2rgb(rgb2hed(i)) * 255), 0, 255)).max()
               for s, i in zip(same, images)) <= 1


def test_colour_jitter_is_colour_twist_with_its_documented_factors():
    images = cells(3)
    identity = np.tile(np.array([0.0, 1.0, 1.0, 1.0], np.float32), (3, 1))
    grey = identity.copy()
    grey[:, 1] = 0.0  # no saturation: every pixel on the grey axis
    darker = identity.copy()
    darker[:, 2] = 0.5
    outs = [run_graph(images, lambda x, m, *f: (stain.colour_jitter(x, f),), *(factors[:, k] for k in range(4)))[0]
            for factors in (identity, grey, darker)]
    for img, same, gray, dark in zip(images, *outs):
        assert np.abs(same.astype(int) - img).max() <= 1
        assert np.abs(gray.astype(int) - gray[..., :1]).max() <= 1
        assert np.abs(dark.astype(int) - np.round(img * 0.5)).max() <= 1


def table(n=50, aug=0):
    return pd.DataFrame({"cell_id": [f"c{i}" for i in range(n)], "aug_index": aug, "width": 64, "height": 64})


def test_jitter_draws_follow_the_row_and_leave_the_warp_as_it_was():
    cfg = AugmentConfig(colour={"enabled": True}, stain={"enabled": True})
    t = table()
    factors = colour_factors(t, cfg, seed=0)
    assert np.array_equal(factors[::-1], colour_factors(t.iloc[::-1], cfg, seed=0))
    assert np.all(np.abs(factors[:, 0]) <= cfg.colour.hue_deg) and np.all(np.abs(factors[:, 1:] - 1) <= 0.2)
    assert not np.array_equal(factors, colour_factors(table(aug=1), cfg, seed=0))
    matrices, shifts = stain_draws(t, cfg, seed=0)
    assert matrices.shape == (50, 3, 3) and shifts.shape == (50, 3) and len({m.tobytes() for m in matrices}) == 50
    assert np.array_equal(row_draws(t, cfg, 0, 32).matrices, affine_matrices(t, AugmentConfig(), 0, 32))
    plain = row_draws(t, AugmentConfig(), 0, 32)
    assert plain.colour is None and plain.stain is None


@pytest.fixture
def smear(tmp_path: Path) -> tuple[pd.DataFrame, Path]:
    for c, colour in (("a", (120, 60, 170)), ("b", (90, 50, 150))):
        for i in range(4):
            img = np.full((24, 24, 3), (230, 210, 200), np.uint8)
            img[6:18, 5:19] = np.array(colour) + 6 * i
            folder = tmp_path / "cells" / c / f"p{i}"
            folder.mkdir(parents=True)
            Image.fromarray(img).save(folder / "x.png")
    manifest = build_manifest(tmp_path / "cells", RunConfig().index).manifest
    return manifest.table, manifest.root


def _images(table, root, cfg, augment):
    return np.concatenate([b.images["imagenet"].numpy() for b in CellLoader(table, root, cfg, augment=augment)])


def test_the_loader_normalises_always_and_jitters_training_cells_only(smear, tmp_path):
    table, root = smear
    ref = write_image(tmp_path / "ref.png", 24, (100, 40, 160))
    base = ["loader.device=cpu", "loader.batch_size=4", "loader.image_size=16", "augment.p_rotate=0",
            "augment.p_scale=0", "augment.p_hflip=0", "augment.p_vflip=0"]
    plain = load_config(None, base)
    normed = load_config(None, base + ["stain_norm.method=reinhard", f"stain_norm.reference={ref}",
                                       "stain_norm.region=cell"])
    jitter = load_config(None, base + ["augment.colour.enabled=true", "augment.stain.enabled=true"])
    none = _images(table, root, plain, augment=False)
    assert np.abs(_images(table, root, normed, augment=False) - none).max() > 0.1  # test cells normalised too
    assert np.array_equal(_images(table, root, jitter, augment=False), none)  # jitter: training copies only
    once = _images(table, root, jitter, augment=True)
    assert np.abs(once - _images(table, root, plain, augment=True)).max() > 0.05
    assert np.array_equal(once, _images(table, root, jitter, augment=True))  # drawn from the row: reproducible


def test_a_reference_that_is_mostly_background_or_missing_is_refused(tmp_path):
    blank = write_image(tmp_path / "blank.png", 24, (235, 220, 205))  # beige: no stained cell at all
    cfg = load_config(None, ["stain_norm.method=reinhard", f"stain_norm.reference={blank}"])
    with pytest.raises(DataError, match=r"blank.png: the HSV mask keeps [0-4]\.\d% of it as cell.*mostly background"):
        stain_target(cfg)
    with pytest.raises(DataError, match="nothing.png: cannot be read"):
        stain_target(load_config(None, ["stain_norm.method=reinhard", f"stain_norm.reference={tmp_path}/nothing.png"]))
    with pytest.raises(Exception, match="needs stain_norm.reference"):
        load_config(None, ["stain_norm.method=reinhard"])


def test_settings_that_contradict_each_other_are_refused_by_name(tmp_path):
    with pytest.raises(Exception, match="region cell takes the statistics over the HSV mask's foreground"):
        load_config(None, ["stain_norm.method=reinhard", f"stain_norm.reference={tmp_path}/r.png",
                           "stain_norm.region=cell", "segmentation.enabled=false"])
    with pytest.raises(Exception, match="augment.colour enabled while augment.enabled is false"):
        load_config(None, ["augment.enabled=false", "augment.colour.enabled=true"])
    relative = load_config(None, ["stain_norm.method=reinhard", "stain_norm.reference=ref.png"])
    assert Path(relative.stain_norm.reference).is_absolute()  # a model's recorded config finds it from anywhere


@pytest.mark.gpu
def test_the_gpu_graph_normalises_and_jitters_as_the_cpu_graph(smear, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    table, root = smear
    ref = write_image(tmp_path / "ref.png", 24, (100, 40, 160))
    settings = ["loader.batch_size=4", "loader.image_size=16", "loader.gpu_dtype=fp32", "stain_norm.method=reinhard",
                f"stain_norm.reference={ref}", "augment.colour.enabled=true", "augment.stain.enabled=true"]
    out = {device: torch.cat([b.images["imagenet"].float().cpu() for b in CellLoader(
        table, root, load_config(None, settings + [f"loader.device={device}"]), augment=True)])
        for device in ("cpu", "gpu")}
    assert (out["cpu"] - out["gpu"]).abs().mean() < 0.02
