"""The DALI loader on the CPU: exactly once, corrupt files mid-run, sharding, decoding, reproducible augmentation."""

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from aml_rapids.config import IndexConfig, load_config
from aml_rapids.data.manifest import build_manifest
from aml_rapids.errors import AmlRapidsError
from aml_rapids.loader.loader import CellLoader, resolve_device

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def colour_tree(root, n, suffix=".png"):
    """n images cycling through three classes whose colour is their label, so a shifted label shows."""
    for i in range(n):
        label = list(COLORS)[i % 3]
        pixels = np.full((12, 12, 3), COLORS[label], np.uint8)
        pixels[0, 0] = [i % 256, i // 256, 0]
        folder = root / label / f"p{i % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}{suffix}")
    return build_manifest(root, IndexConfig(verify_decode=False)).manifest


def cfg(**over):
    base = {"loader.device": "cpu", "loader.batch_size": 64, "loader.image_size": 16, "loader.num_threads": 2,
            "segmentation.enabled": False}
    base.update(over)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def dominant(batch_images):
    """Class name of each image from its mean colour (normalisation keeps the channel order)."""
    means = batch_images.float().mean(dim=(2, 3))
    return [list(COLORS)[int(i)] for i in means.argmax(dim=1)]


def check_labels(loader, table):
    seen = []
    for batch in loader:
        assert dominant(batch.images["imagenet"]) == list(table["label"].iloc[batch.positions])
        seen += batch.positions.tolist()
    return seen


def test_every_row_exactly_once_with_a_partial_last_batch(tmp_path):
    manifest = colour_tree(tmp_path, 1001)
    loader = CellLoader(manifest.table, manifest.root, cfg())
    seen = check_labels(loader, manifest.table)
    assert len(seen) == 1001 and sorted(seen) == list(range(1001))
    assert sorted(manifest.table["cell_id"].iloc[seen]) == sorted(manifest.table["cell_id"])


def test_batches_stay_intact_while_their_consumer_holds_them(tmp_path):
    """On a CPU DALI hands its own buffers over without a copy: a held batch must not be overwritten by later
    ones (64 rows a batch, three colours cycling, so a recycled buffer would also show the wrong colours)."""
    manifest = colour_tree(tmp_path, 640)
    held = [(batch, batch.images["imagenet"].clone()) for batch in CellLoader(manifest.table, manifest.root, cfg())]
    assert len(held) == 10
    for batch, at_delivery in held:
        assert torch.equal(batch.images["imagenet"], at_delivery)
        assert dominant(batch.images["imagenet"]) == list(manifest.table["label"].iloc[batch.positions])


def test_shards_partition_the_rows(tmp_path):
    manifest = colour_tree(tmp_path, 203)
    parts = [check_labels(CellLoader(manifest.table, manifest.root, cfg(), shard_id=k, num_shards=3), manifest.table)
             for k in range(3)]
    assert sorted(sum(parts, [])) == list(range(203))
    assert all(len(p) in (67, 68) for p in parts)


def test_corrupt_files_mid_run_are_reported_and_labels_stay_right(tmp_path):
    manifest = colour_tree(tmp_path, 400)
    paths = manifest.paths()
    paths[150].write_bytes(b"not an image any more")
    data = paths[333].read_bytes()
    paths[333].write_bytes(data[: len(data) // 3])
    paths[334].write_bytes(b"")
    loader = CellLoader(manifest.table, manifest.root, cfg())
    seen = check_labels(loader, manifest.table)
    assert sorted(seen) == sorted(set(range(400)) - {150, 333, 334})
    failed = {f.path: f.reason for f in loader.failures}
    assert set(failed) == {str(paths[i]) for i in (150, 333, 334)}
    assert all("changed since indexing" in r for r in failed.values())
    paths[10].unlink()
    loader = CellLoader(manifest.table, manifest.root, cfg())
    assert sorted(check_labels(loader, manifest.table)) == sorted(set(range(400)) - {10, 150, 333, 334})
    assert "unreadable since indexing" in {f.path: f.reason for f in loader.failures}[str(paths[10])]


def test_files_rewritten_at_the_same_size_are_caught_before_dali(tmp_path):
    """Same size, new content (garbage, or another cell's image): left out by the modification-time check and
    the hash, never handed to DALI, whose decoders can crash the process on such files. A file merely touched
    (same content, new time) is still used, and so is a manifest from before 0.4 (no mtime_ns)."""
    manifest = colour_tree(tmp_path, 300, suffix=".tif")  # uncompressed: every file has the same size
    paths = manifest.paths()
    paths[100].write_bytes(os.urandom(paths[100].stat().st_size))
    paths[200].write_bytes(paths[201].read_bytes())  # another class's cell, same size
    later = time.time_ns() + 10**9
    os.utime(paths[50], ns=(later, later))
    loader = CellLoader(manifest.table, manifest.root, cfg())
    assert sorted(check_labels(loader, manifest.table)) == sorted(set(range(300)) - {100, 200})
    failed = {f.path: f.reason for f in loader.failures}
    assert set(failed) == {str(paths[100]), str(paths[200])}
    assert "modified since indexing and now unusable: not an image" in failed[str(paths[100])]
    assert "content differs from the indexed file" in failed[str(paths[200])]
    before_0_4 = manifest.table.drop(index=[100, 200], columns="mtime_ns").reset_index(drop=True)
    old = CellLoader(before_0_4, manifest.root, cfg())
    assert len(check_labels(old, before_0_4)) == 298 and not old.failures


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_modes_are_decoded_to_8bit_rgb(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        gray = np.asarray(img.convert("L")).astype(np.uint16) * 257
        img, expected = Image.fromarray(gray), np.repeat(np.asarray(img.convert("L"))[..., None], 3, axis=2)
    else:
        img = img.convert(mode)
        expected = np.asarray(img.convert("RGB"))
    (tmp_path / "x" / "p").mkdir(parents=True)
    img.save(tmp_path / "x" / "p" / "a.png")
    manifest = build_manifest(tmp_path, IndexConfig()).manifest
    loader = CellLoader(manifest.table, manifest.root, cfg(**{"loader.image_size": 12}), debug=True)
    (batch,) = list(loader)
    decoded = batch.views["decoded"][0].numpy()
    assert decoded.dtype == np.uint8 and decoded.shape == (12, 12, 3)
    assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 1


def test_augmentation_is_seeded_per_row_and_eval_is_not_augmented(tmp_path):
    from conftest import write_image
    for i in range(11):
        write_image(tmp_path / "a" / "p" / f"{i}.png", size=24, fmt="PNG")
    manifest = build_manifest(tmp_path, IndexConfig()).manifest

    def run(augment, seed, batch=64, table=manifest.table):
        loader = CellLoader(table, manifest.root, cfg(**{"loader.seed": seed, "loader.batch_size": batch}),
                            augment=augment)
        out = {}
        for b in loader:
            out.update({int(p): img for p, img in zip(b.positions, b.images["imagenet"])})
        return torch.stack([out[i] for i in range(len(table))])

    assert torch.equal(run(True, 1), run(True, 1))
    assert torch.equal(run(True, 1), run(True, 1, batch=4))
    assert not torch.equal(run(True, 1), run(True, 2))
    assert torch.equal(run(False, 1), run(False, 2))
    assert not torch.equal(run(True, 1), run(False, 1))
    reversed_rows = manifest.table.iloc[::-1].reset_index(drop=True)
    assert torch.equal(run(True, 1), run(True, 1, table=reversed_rows).flip(0))


def test_a_certain_horizontal_flip_is_an_exact_mirror(tmp_path):
    from conftest import write_image
    write_image(tmp_path / "a" / "p" / "x.png", size=16, fmt="PNG")
    manifest = build_manifest(tmp_path, IndexConfig()).manifest
    flip_only = {"augment.p_rotate": 0, "augment.p_scale": 0, "augment.p_hflip": 1, "augment.p_vflip": 0}
    plain = next(iter(CellLoader(manifest.table, manifest.root, cfg()))).images["imagenet"]
    flipped = next(iter(CellLoader(manifest.table, manifest.root, cfg(**flip_only), augment=True))).images["imagenet"]
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-5)


def test_asking_for_a_gpu_without_one_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(AmlRapidsError, match="no CUDA GPU"):
        resolve_device("gpu")
    assert resolve_device("auto") == "cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_decode", [True, False])
def test_gpu_graph_matches_cpu_graph(tmp_path, gpu_decode):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    manifest = colour_tree(tmp_path, 130)
    out = {}
    for device in ("cpu", "gpu"):
        loader = CellLoader(manifest.table, manifest.root, cfg(**{"loader.device": device, "segmentation.enabled": True,
                                                                  "loader.gpu_decode": gpu_decode}))
        batches = list(loader)
        assert all(b.images["imagenet"].device.type == ("cuda" if device == "gpu" else "cpu") for b in batches)
        out[device] = torch.cat([b.images["imagenet"].float().cpu() for b in batches])
    assert (out["cpu"] - out["gpu"]).abs().mean() < 0.02


def test_an_augmentation_that_does_nothing_matches_the_plain_resize(tmp_path):
    """Training copies go through one warp that also resizes; with every augmentation off it must give what
    validation rows get, or augmented training features drift from test features."""
    from conftest import write_image
    for i in range(4):
        write_image(tmp_path / "a" / "p" / f"{i}.png", size=24, fmt="PNG")
    manifest = build_manifest(tmp_path, IndexConfig()).manifest
    off = {"augment.p_rotate": 0, "augment.p_scale": 0, "augment.p_hflip": 0, "augment.p_vflip": 0,
           "loader.image_size": 40}
    plain = torch.cat([b.images["imagenet"] for b in CellLoader(manifest.table, manifest.root, cfg(**off))])
    warped = torch.cat([b.images["imagenet"] for b in CellLoader(manifest.table, manifest.root, cfg(**off),
                                                                 augment=True)])
    assert (plain - warped).abs().mean() < 0.01
