import math

import pandas as pd
import pytest

from aml_rapids.errors import DataError
from aml_rapids.loader.oversample import loader_table, oversample


def table():
    counts = {"a": 100, "b": 37, "c": 9, "d": 100}
    rows = [{"cell_id": f"{k}{i}", "label": k, "split": "train"} for k, n in counts.items() for i in range(n)]
    return pd.DataFrame(rows), counts


def test_every_class_reaches_the_largest_and_no_row_is_drawn_too_often():
    t, counts = table()
    out = oversample(t, seed=3)
    assert out["label"].value_counts().to_dict() == {k: 100 for k in counts}
    draws = out.groupby("cell_id").size()
    for label, n in counts.items():
        assert draws[[f"{label}{i}" for i in range(n)]].max() <= math.ceil(100 / n)
    assert not out.duplicated(["cell_id", "aug_index"]).any()
    assert (out.loc[out["label"] == "a", "aug_index"] == 0).all()


def test_same_seed_same_list_other_seed_other_list():
    t, _ = table()
    assert oversample(t, 1).equals(oversample(t, 1))
    assert not oversample(t, 1).equals(oversample(t, 2))


def test_only_train_is_oversampled():
    t, _ = table()
    t.loc[t.index[::5], "split"] = "test"
    assert (loader_table(t, "test", True, 0)["aug_index"] == 0).all()
    assert len(loader_table(t, "test", True, 0)) == (t["split"] == "test").sum()
    train = loader_table(t, "train", True, 0)
    assert train["label"].value_counts().nunique() == 1
    assert len(loader_table(t, "train", False, 0)) == (t["split"] == "train").sum()
    with pytest.raises(DataError, match="aml-rapids split"):
        loader_table(t.drop(columns="split"), "train", True, 0)
