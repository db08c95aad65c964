import numpy as np
import pandas as pd

from aml_rapids.config import AugmentConfig
from aml_rapids.loader.augment import affine_matrices, row_uniforms


def table(n=400, aug=0):
    return pd.DataFrame({"cell_id": [f"c{i}" for i in range(n)], "aug_index": aug, "width": 144, "height": 144})


def decompose(m):
    """Rotation angle (deg), |scale x|, |scale y|, flips, from a 2x3 matrix built as R @ diag(sx*fx, sy*fy)."""
    linear = m[:, :2]
    sx, sy = np.linalg.norm(linear[:, 0]), np.linalg.norm(linear[:, 1])
    det_sign = np.sign(np.linalg.det(linear))
    return sx, sy, det_sign


def test_ranges_probabilities_and_centre():
    cfg = AugmentConfig()
    mats = affine_matrices(table(), cfg, seed=0, out_size=144)
    assert mats.shape == (400, 2, 3) and mats.dtype == np.float32
    parts = np.array([decompose(m) for m in mats])
    assert (parts[:, 0] >= 0.9 - 1e-5).all() and (parts[:, 0] <= 1.1 + 1e-5).all()
    assert (parts[:, 1] >= 0.9 - 1e-5).all() and (parts[:, 1] <= 1.1 + 1e-5).all()
    assert 0.3 < (parts[:, 2] < 0).mean() < 0.7  # exactly one flip flips orientation: p = 0.5
    centre = np.array([72.0, 72.0])
    for m in mats[:20]:
        moved = m[:, :2] @ centre + m[:, 2]
        assert np.allclose(moved, centre, atol=1e-3)


def test_identity_when_every_probability_is_zero_and_the_resize_is_folded_in():
    cfg = AugmentConfig(p_rotate=0, p_scale=0, p_hflip=0, p_vflip=0)
    mats = affine_matrices(table(10), cfg, seed=0, out_size=144)
    assert np.allclose(mats, np.array([[1, 0, 0], [0, 1, 0]], np.float32))
    upscale = affine_matrices(table(3), cfg, seed=0, out_size=224)
    assert np.allclose(upscale, np.array([[224 / 144, 0, 0], [0, 224 / 144, 0]], np.float32))


def test_matrices_depend_on_row_identity_not_position():
    cfg = AugmentConfig()
    t = table(50)
    a = affine_matrices(t, cfg, seed=3, out_size=144)
    assert np.array_equal(a[::-1], affine_matrices(t.iloc[::-1], cfg, seed=3, out_size=144))
    assert not np.array_equal(a, affine_matrices(table(50, aug=1), cfg, seed=3, out_size=144))
    assert not np.array_equal(a, affine_matrices(t, cfg, seed=4, out_size=144))


def test_row_uniforms_are_uniform_and_independent_across_columns_and_copies():
    ids = [f"cohort:NPM1/p{i // 50}/cell{i}.tif" for i in range(20000)]
    u = row_uniforms(0, ids, np.zeros(20000), 7)
    assert u.shape == (20000, 7) and (u >= 0).all() and (u < 1).all()
    counts = np.stack([np.histogram(col, bins=10, range=(0, 1))[0] for col in u.T])
    assert np.abs(counts - 2000).max() < 200  # each decile within 10% (binomial sd is 42)
    assert np.abs(np.corrcoef(u.T) - np.eye(7)).max() < 0.05
    copy = row_uniforms(0, ids, np.ones(20000), 7)  # the same cells' next oversampled copies
    assert abs(np.corrcoef(u[:, 1], copy[:, 1])[0, 1]) < 0.05


def test_rotation_angles_fill_the_configured_range():
    cfg = AugmentConfig(rotate_deg=10, p_scale=0, p_hflip=0, p_vflip=0)
    mats = affine_matrices(table(2000), cfg, seed=1, out_size=144)
    angles = np.degrees(np.arctan2(mats[:, 1, 0], mats[:, 0, 0]))
    assert angles.min() > -10 - 1e-4 and angles.max() < 10 + 1e-4
    assert angles.min() < -9.5 and angles.max() > 9.5 and abs(angles.mean()) < 0.5
    half = AugmentConfig(rotate_deg=10, p_rotate=0.3, p_scale=0, p_hflip=0, p_vflip=0)
    rotated = np.abs(affine_matrices(table(2000), half, seed=1, out_size=144)[:, 1, 0]) > 0
    assert 0.25 < rotated.mean() < 0.35
