"""Indexing: layouts, CSV input, and every kind of bad input named in a clear message."""

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from aml_rapids.config import IndexConfig
from aml_rapids.data.manifest import build_manifest, read_manifest, summarize, write_manifest
from aml_rapids.errors import DataError

from conftest import write_image


def reasons(result):
    return {os.path.relpath(p.path, result.manifest.root) if os.path.isabs(p.path) else p.path: p.reason
            for p in result.problems}


def test_class_patient_image_layout(tiny_tree):
    result = build_manifest(tiny_tree, IndexConfig())
    t = result.manifest.table
    assert result.layout == "class/patient/image"
    assert summarize(result.manifest) == {"cells": 60, "classes": 3, "patients": 12,
                                          "per_class": {"a": 20, "b": 20, "c": 20}}
    assert t["cell_id"].is_unique and not result.problems
    assert set(t["patient"]) == {f"{c}_p{p}" for c in "abc" for p in range(4)}
    assert (t["width"] == 16).all() and (t["mode"] == "RGB").all() and (t["format"] == "TIFF").all()
    assert t["sha256"].str.len().eq(64).all() and (t["cohort"] == "tree").all()


def test_class_image_layout_and_extensions(tmp_path):
    write_image(tmp_path / "x" / "one.PNG", fmt="PNG")
    write_image(tmp_path / "x" / "two.JpEg", fmt="JPEG")
    write_image(tmp_path / "y" / "three.bmp", fmt="BMP")
    write_image(tmp_path / "y" / "four.TIFF", fmt="TIFF")
    result = build_manifest(tmp_path, IndexConfig())
    assert result.layout == "class/image"
    assert summarize(result.manifest)["per_class"] == {"x": 2, "y": 2}
    assert result.manifest.table["patient"].isna().all()


def test_cell_ids_are_stable_and_manifest_round_trips(tiny_tree, tmp_path):
    first = build_manifest(tiny_tree, IndexConfig()).manifest
    write_image(tiny_tree / "a" / "a_p0" / "new.tif")
    second = build_manifest(tiny_tree, IndexConfig()).manifest
    assert set(first.table["cell_id"]) < set(second.table["cell_id"])
    write_manifest(second, tmp_path / "m.parquet")
    back = read_manifest(tmp_path / "m.parquet")
    pd.testing.assert_frame_equal(back.table, second.table)
    assert back.root == second.root and back.digest() == second.digest()
    assert all(p.is_file() for p in back.paths())


def test_bad_files_are_rejected_with_reasons_and_the_rest_indexed(tiny_tree):
    (tiny_tree / "a" / "a_p0" / "text.tif").write_text("this is not an image")
    (tiny_tree / "a" / "a_p0" / "empty.tif").write_bytes(b"")
    good = (tiny_tree / "b" / "b_p0" / "img0.tif").read_bytes()
    write_image(tiny_tree / "b" / "b_p0" / "big.png", size=64, fmt="PNG")
    data = (tiny_tree / "b" / "b_p0" / "big.png").read_bytes()
    (tiny_tree / "b" / "b_p0" / "truncated.png").write_bytes(data[: len(data) // 2])
    (tiny_tree / "b" / "b_p0" / "big.png").unlink()
    (tiny_tree / "c" / "c_p0" / "copy_of_b.tif").write_bytes(good)
    Image.fromarray(np.zeros((8, 8), np.float32)).save(tiny_tree / "c" / "c_p1" / "float.tif")
    (tiny_tree / "c" / "c_p1" / "notes.txt").write_text("hello")
    (tiny_tree / "empty_class").mkdir()
    result = build_manifest(tiny_tree, IndexConfig())
    why = reasons(result)
    assert "not an image" in why["a/a_p0/text.tif"]
    assert "empty file (0 bytes)" in why["a/a_p0/empty.tif"]
    assert "truncated or corrupt" in why["b/b_p0/truncated.png"]
    assert "same content under two classes" in why["c/c_p0/copy_of_b.tif"]
    assert "same content under two classes" in why["b/b_p0/img0.tif"]
    assert "no defined 8-bit RGB conversion" in why["c/c_p1/float.tif"]
    assert "unsupported file type" in why["c/c_p1/notes.txt"]
    assert "class folder has no usable images" in why["empty_class"]
    assert len(result.manifest.table) == 60 - 1
    assert not result.manifest.table["path"].str.contains("text|empty|truncated|copy_of|float").any()


def test_same_class_duplicates_are_kept_and_counted(tiny_tree):
    (tiny_tree / "a" / "a_p1" / "dup.tif").write_bytes((tiny_tree / "a" / "a_p0" / "img0.tif").read_bytes())
    result = build_manifest(tiny_tree, IndexConfig())
    assert len(result.manifest.table) == 61 and result.same_class_duplicates == 1 and not result.problems


def test_symlink_loop_is_reported_not_followed(tiny_tree):
    os.symlink(tiny_tree / "a", tiny_tree / "a" / "a_p0" / "loop")
    result = build_manifest(tiny_tree, IndexConfig())
    assert any("symlink loop" in p.reason and p.path.endswith("loop") for p in result.problems)
    assert len(result.manifest.table) == 60


@pytest.mark.parametrize("make, words", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: (tmp / "f.tif").write_bytes(b"x") and tmp / "f.tif", "is not a folder"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no images"),
])
def test_unusable_roots(tmp_path, make, words):
    with pytest.raises(DataError, match=words):
        build_manifest(make(tmp_path), IndexConfig())


def test_csv_input_with_extra_columns(tiny_tree):
    files = sorted(tiny_tree.rglob("*.tif"))[:6]
    pd.DataFrame({
        "path": [str(f.relative_to(tiny_tree)) for f in files],
        "diagnosis": [f.parts[-3] for f in files],
        "patient": [f.parts[-2] for f in files],
        "cohort": "discovery",
        "cell_type": "blast",
    }).to_csv(tiny_tree / "list.csv", index=False)
    result = build_manifest(tiny_tree / "list.csv", IndexConfig())
    t = result.manifest.table
    assert len(t) == 6 and (t["cohort"] == "discovery").all() and (t["cell_type"] == "blast").all()
    assert list(t["label"]) == [f.parts[-3] for f in files]


def test_csv_missing_columns_and_paths(tiny_tree):
    csv = tiny_tree / "bad.csv"
    pd.DataFrame({"file": ["a/a_p0/img0.tif"], "label": ["a"]}).to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"bad\.csv: missing the 'path' column; columns are file, label"):
        build_manifest(csv, IndexConfig())
    pd.DataFrame({"path": ["a/a_p0/img0.tif"], "kind": ["a"]}).to_csv(csv, index=False)
    with pytest.raises(DataError, match="missing the label column"):
        build_manifest(csv, IndexConfig())
    pd.DataFrame({"path": ["a/a_p0/img0.tif", "a/a_p0/ghost.tif"], "label": ["a", "a"]}).to_csv(csv, index=False)
    result = build_manifest(csv, IndexConfig())
    assert len(result.manifest.table) == 1
    assert "bad.csv line 3 but does not exist" in reasons(result)["a/a_p0/ghost.tif"]
