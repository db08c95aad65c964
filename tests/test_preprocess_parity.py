"""The DALI graph against independent references: OpenCV's HSV for the mask, torchvision for resize+normalise."""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from aml_rapids.config import IndexConfig, SegmentationConfig, load_config
from aml_rapids.data.manifest import build_manifest
from aml_rapids.loader.loader import CellLoader

SEG = SegmentationConfig()


def opencv_mask(rgb: np.ndarray, seg: SegmentationConfig = SEG) -> np.ndarray:
    hsv = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    in_range = (h >= seg.hue_min) & (h <= seg.hue_max) if seg.hue_min <= seg.hue_max else (h >= seg.hue_min) | (h <= seg.hue_max)
    return in_range & (s >= seg.saturation_min) & (v >= seg.value_min) & (v <= seg.value_max) & (s > 0)


def iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def loader_views(table, root, **over):
    base = {"loader.device": "cpu", "loader.batch_size": 50, "loader.num_threads": 2}
    base.update(over)
    cfg = load_config(None, [f"{k}={v}" for k, v in base.items()])
    views = {}
    for batch in CellLoader(table, root, cfg, debug=True):
        for i, pos in enumerate(batch.positions):
            views[int(pos)] = (batch.views["decoded"][i].numpy(), batch.views["mask"][i].numpy()[..., 0] > 0,
                               batch.images["imagenet"][i])
    return views


def reference_tensor(path):
    tf = transforms.Compose([transforms.Resize(224), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return tf(Image.open(path).convert("RGB"))


def pixel_mae(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two ImageNet-normalised tensors, in [0, 1] pixel units."""
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    return float(((a.float() - b.float()) * std).abs().mean())


# Bounds no 8-bit colour meets exactly (hue 30 or 300 and value 0.8 it does: there OpenCV's float32 rounding,
# not the mask, decides which side a pixel falls on).
@pytest.mark.parametrize("hue_min,hue_max,sat_min,value_max", [
    (195, 325, 0.15, 1.0),  # the default: a hue range under 180 degrees (two half-spaces, intersected)
    (32.3, 297.7, 0.0, 0.81),  # wider than 180 degrees (their union), no saturation floor, a value ceiling
    (302.3, 57.7, 0.3, 1.0),  # a range through 0 (red)
])
def test_hsv_mask_matches_opencv_on_random_colours(tmp_path, hue_min, hue_max, sat_min, value_max):
    rng = np.random.default_rng(0)
    for i in range(4):
        (tmp_path / "c" / "p").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "c" / "p" / f"{i}.png")
    manifest = build_manifest(tmp_path, IndexConfig()).manifest
    seg = SegmentationConfig(hue_min=hue_min, hue_max=hue_max, saturation_min=sat_min, value_max=value_max)
    views = loader_views(manifest.table, manifest.root, **{f"segmentation.{k}": v for k, v in seg.model_dump().items()})
    for (decoded, mask, _) in views.values():
        reference = opencv_mask(decoded, seg)
        assert 0.05 < reference.mean() < 0.95
        assert iou(mask, reference) >= 0.995


def test_resize_normalise_matches_torchvision_on_synthetic_cells(tmp_path):
    from aml_rapids.data.synthetic import write_demo_dataset
    write_demo_dataset(tmp_path, patients_per_class=1, cells_per_patient=2)
    manifest = build_manifest(tmp_path, IndexConfig()).manifest
    views = loader_views(manifest.table, manifest.root, **{"segmentation.enabled": False})
    for pos, path in enumerate(manifest.paths()):
        assert pixel_mae(views[pos][2], reference_tensor(path)) < 2 / 255


@pytest.mark.realdata
@pytest.mark.slow
def test_parity_on_500_real_pbc_cells(shared_data):
    manifest = build_manifest(shared_data / "pbc144", IndexConfig(verify_decode=False)).manifest
    table = manifest.table.sample(500, random_state=0).reset_index(drop=True)
    masked = loader_views(table, manifest.root)
    plain = loader_views(table, manifest.root, **{"segmentation.enabled": False})
    ious, maes = [], []
    for pos in range(len(table)):
        decoded, mask, _ = masked[pos]
        ious.append(iou(mask, opencv_mask(decoded)))
        maes.append(pixel_mae(plain[pos][2], reference_tensor(manifest.root / table["path"][pos])))
    print(f"mask IoU vs OpenCV: mean {np.mean(ious):.4f}, min {np.min(ious):.4f}; "
          f"resize+normalise MAE vs torchvision: mean {np.mean(maes) * 255:.3f}/255, max {np.max(maes) * 255:.3f}/255")
    assert np.mean(ious) >= 0.98
    assert np.mean(maes) < 2 / 255
