"""A store read as any zarr, xarray or dask user would: docs/reading-a-store.md run as written, the attributes
that say what the store holds, consolidated metadata kept current through appends and rollbacks, and stores
made before padding rows lost their split."""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from aml_rapids.classify.data import select_rows
from aml_rapids.config import IndexConfig, load_config
from aml_rapids.data.manifest import Manifest, build_manifest
from aml_rapids.data.splits import make_split
from aml_rapids.data.synthetic import write_demo_dataset
from aml_rapids.errors import OutputError
from aml_rapids.features.extract import extract
from aml_rapids.features.plan import ROW_FIELDS, STATUS_NAMES, STATUS_PADDING, STATUS_PENDING, TEXT_FIELDS
from aml_rapids.features.store import JOURNAL, FeatureStore

from conftest import REPO, python_blocks
from test_features import cfg, demo_manifest

xr = pytest.importorskip("xarray")

GUIDE = REPO / "docs" / "reading-a-store.md"
GUIDE_STORE = "runs/demo/features.zarr"  # where the guide's first example points


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> Path:
    """A finished store at ``<tmp>/runs/demo/features.zarr``: a split demo manifest, one file changed since
    indexing (a failed row)."""
    root = tmp_path_factory.mktemp("reader")
    manifest = demo_manifest(root / "data")
    manifest.paths()[3].write_bytes(b"gone bad")
    summary = extract(manifest, root / GUIDE_STORE, cfg())
    assert summary.rows_failed == 1
    return root / GUIDE_STORE


@pytest.fixture
def cohorts(tmp_path) -> tuple[Path, Manifest]:
    """A store extracted from a split manifest (2 patients a class), and a second manifest that lists those cells
    as they were and a third patient a class, split apart: extracting it appends them."""
    first = demo_manifest(tmp_path / "data", patients=2, cells=5)
    extract(first, tmp_path / "s.zarr", cfg())
    write_demo_dataset(tmp_path / "data", 3, 5, seed=0)
    both = build_manifest(tmp_path / "data", IndexConfig(verify_decode=False)).manifest
    new = both.table[~both.table["cell_id"].isin(first.table["cell_id"])]
    split = load_config(None, ["split.method=image", "split.allow_incomplete=true"]).split
    both.table = pd.concat([first.table, make_split(new, split).table], ignore_index=True)
    return tmp_path / "s.zarr", both


@contextmanager
def consolidated_metadata_warnings_raised():
    """Any warning about consolidated metadata (xarray's "Failed to open Zarr store with consolidated metadata,
    but successfully read with non-consolidated metadata") as an error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="(?i).*consolidated metadata")
        yield


def array_metadata(path: Path, consolidated: bool) -> dict[str, dict]:
    """Every array's metadata, from the root's consolidated copy or from each array's own zarr.json."""
    group = zarr.open_group(str(path), mode="r", use_consolidated=consolidated)
    return {name: node.metadata.to_dict() for name, node in group.members(max_depth=None)
            if isinstance(node, zarr.Array)}


def test_the_reading_guide_runs_as_written(demo_store, monkeypatch):
    """Every ```python block of the guide, the first (which sets ``store_path``) and then each of the others on
    its own, run where the first block's path leads to the store."""
    blocks = python_blocks(GUIDE)
    assert len(blocks) == 4 and f'store_path = "{GUIDE_STORE}"' in blocks[0]
    monkeypatch.chdir(demo_store.parents[2])
    first: dict = {}
    with consolidated_metadata_warnings_raised():
        exec(compile(blocks[0], f"{GUIDE.name} block 1", "exec"), first)
        for k, block in enumerate(blocks[1:], 2):
            exec(compile(block, f"{GUIDE.name} block {k}", "exec"), {"store_path": first["store_path"]})


def test_a_store_names_its_status_codes_and_what_each_array_holds(demo_store):
    group = zarr.open_group(str(demo_store), mode="r")
    assert group.attrs["aml_rapids"]["status_codes"] == {"0": "pending", "1": "ok", "2": "failed", "3": "padding"}
    status = group["rows/status"]
    assert dict(zip(status.attrs["flag_values"], status.attrs["flag_meanings"].split())) == STATUS_NAMES
    arrays = {name: node for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}
    assert set(arrays) == {"features/tiny", "progress/chunk_done", *(f"rows/{f}" for f in ROW_FIELDS)}
    assert all(node.attrs["long_name"] and node.metadata.dimension_names for node in arrays.values())
    assert group["progress/chunk_done"].metadata.dimension_names == ("chunk",)


def test_padding_rows_have_no_split_nor_any_other_text(demo_store):
    rows = FeatureStore.open(demo_store).rows()
    padding = rows[rows["status"] == STATUS_PADDING]
    assert len(padding) and (padding[list(TEXT_FIELDS)] == "").all().all()
    assert (padding[["aug_index", "fold"]] == -1).all().all()
    assert "" not in set(rows.loc[rows["status"] != STATUS_PADDING, "split"])


def test_xarray_opens_the_whole_store_and_each_group_without_a_warning(demo_store):
    with consolidated_metadata_warnings_raised():
        tree = xr.open_datatree(demo_store, engine="zarr")
        rows, features = (xr.open_zarr(demo_store, group=g) for g in ("rows", "features"))
    assert set(tree.children) == {"features", "progress", "rows"}
    assert set(tree["rows"].data_vars) == set(ROW_FIELDS) and set(rows.data_vars) == set(ROW_FIELDS)
    n_rows = FeatureStore.open(demo_store).n_rows
    assert features["tiny"].sizes == {"row": n_rows, "tiny_feature": 16}
    assert tree["progress"]["chunk_done"].values.all()
    split = rows["split"].values
    assert all(isinstance(s, str) for s in split.tolist()) and set(split) == {"train", "val", "test", ""}
    assert rows["status"].attrs["flag_meanings"] == "pending ok failed padding"


def test_consolidated_metadata_is_current_after_creation_append_and_rollback(cohorts, monkeypatch):
    path, both = cohorts
    assert array_metadata(path, consolidated=True) == array_metadata(path, consolidated=False)  # chunks written
    root_before, rows_before = (path / "zarr.json").read_bytes(), FeatureStore.open(path).n_rows

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zarr, "consolidate_metadata", disk_full)  # the append's last step fails
    with pytest.raises(OutputError, match="No space left on device"):
        extract(both, path, cfg())
    monkeypatch.undo()
    assert not (path / JOURNAL).exists() and (path / "zarr.json").read_bytes() == root_before  # rolled back
    assert array_metadata(path, consolidated=True) == array_metadata(path, consolidated=False)

    summary = extract(both, path, cfg())
    assert summary.rows_appended > 0 and FeatureStore.open(path).n_rows > rows_before
    assert array_metadata(path, consolidated=True) == array_metadata(path, consolidated=False)
    assert len(zarr.open_group(str(path), mode="r").attrs["aml_rapids"]["manifests"]) == 2


def test_aml_rapids_reads_each_arrays_own_metadata_not_the_consolidated_copy(cohorts):
    """A consolidated copy that lags the arrays (here: the one from before an append, put back) misleads zarr's
    default open, not aml-rapids."""
    path, both = cohorts
    stale = json.loads((path / "zarr.json").read_text())["consolidated_metadata"]
    extract(both, path, cfg())
    root = json.loads((path / "zarr.json").read_text())
    (path / "zarr.json").write_text(json.dumps({**root, "consolidated_metadata": stale}))
    grown = zarr.open_group(str(path), mode="r", use_consolidated=False)["rows/status"].shape[0]
    assert zarr.open_group(str(path), mode="r")["rows/status"].shape[0] < grown  # zarr's default: the copy
    store = FeatureStore.open(path)
    assert store.n_rows == grown and len(store.rows()) == grown and store.done_chunks().all()


def make_it_old(path: Path) -> np.ndarray:
    """Make a store look as one made before padding rows lost their split: each padding row takes its chunk's
    (its segment's) split; the root has no consolidated metadata nor status codes; chunk_done has no dimension
    name nor attributes. Returns the split column as it now is."""
    store = FeatureStore.open(path, mode="r+")
    status = store.read("rows/status").reshape(-1, store.chunk_rows)
    split = store.read("rows/split").reshape(-1, store.chunk_rows)
    old_split = np.where(status == STATUS_PADDING, split[:, :1], split).ravel()
    store.group["rows/split"][:] = old_split
    root = json.loads((path / "zarr.json").read_text())
    del root["consolidated_metadata"], root["attributes"]["aml_rapids"]["status_codes"]
    (path / "zarr.json").write_text(json.dumps(root))
    marks = json.loads((path / "progress" / "chunk_done" / "zarr.json").read_text())
    del marks["dimension_names"]
    (path / "progress" / "chunk_done" / "zarr.json").write_text(json.dumps({**marks, "attributes": {}}))
    return old_split


def test_a_store_whose_padding_rows_carry_their_split_resumes_and_appends_as_before(cohorts, tmp_path):
    """An older store, resumed (a chunk with padding not done) and appended to, holds the rows and features of a
    current store appended to, its old padding rows keeping their split; the classifier reads the same rows."""
    path, both = cohorts
    shutil.copytree(path, tmp_path / "current.zarr")
    old_split = make_it_old(path)
    store = FeatureStore.open(path, mode="r+")
    assert "status_codes" not in store.meta
    status = store.read("rows/status").reshape(-1, store.chunk_rows)
    padding = status.ravel() == STATUS_PADDING
    assert padding.any() and (old_split[padding] != "").all()
    padded = int(np.flatnonzero((status == STATUS_PADDING).any(axis=1))[0])
    store.group["progress/chunk_done"][padded] = False  # as a run killed before this chunk was written leaves it
    store.group["rows/status"][store.chunk_slice(padded)] = np.where(status[padded] == STATUS_PADDING,
                                                                     STATUS_PADDING, STATUS_PENDING)

    resumed = extract(both, path, cfg())
    current = extract(both, tmp_path / "current.zarr", cfg())
    pending = int((status[padded] != STATUS_PADDING).sum())
    assert resumed.rows_appended == current.rows_appended > 0
    assert resumed.rows_written == current.rows_written + pending
    old, new = FeatureStore.open(path), FeatureStore.open(tmp_path / "current.zarr")
    np.testing.assert_array_equal(old.features("tiny")[:], new.features("tiny")[:])
    old_rows, new_rows, n_old = old.rows(), new.rows(), len(old_split)
    assert (old_rows["split"].iloc[:n_old] == old_split).all() and old_rows.iloc[n_old:].equals(new_rows.iloc[n_old:])
    assert old_rows.drop(columns="split").equals(new_rows.drop(columns="split"))
    for split_name in ("train", "val", "test"):
        mask, chosen = select_rows(old, (split_name,))
        assert (mask == select_rows(new, (split_name,))[0]).all() and set(chosen["split"]) == {split_name}
    assert array_metadata(path, consolidated=True) == array_metadata(path, consolidated=False)  # by the append
