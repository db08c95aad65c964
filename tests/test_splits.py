"""Splits: groups never straddle parts, every class reaches every part, seeds reproduce."""

import numpy as np
import pandas as pd
import pytest

from aml_rapids.config import SplitConfig
from aml_rapids.data.splits import groups_in_several_parts, make_split
from aml_rapids.errors import SplitError


def table(patients_per_class=(8, 6, 5), cells=lambda p: 5 + 3 * p, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for c, n in enumerate(patients_per_class):
        for p in range(n):
            for i in range(cells(p)):
                rows.append({"label": f"class{c}", "patient": f"c{c}p{p}", "sha256": f"{c}-{p}-{i}-{rng.random()}"})
    return pd.DataFrame(rows)


def test_patient_split_keeps_patients_whole_and_every_class_everywhere():
    result = make_split(table(), SplitConfig(method="patient"))
    t = result.table
    assert groups_in_several_parts(t, "split") == []
    assert (t.groupby("label")["split"].nunique() == 3).all()
    assert not result.missing


def test_seed_reproduces_and_changes_the_split():
    a = make_split(table(), SplitConfig(seed=1)).table["split"]
    b = make_split(table(), SplitConfig(seed=1)).table["split"]
    c = make_split(table(), SplitConfig(seed=2)).table["split"]
    assert a.equals(b) and not a.equals(c)


def test_image_split_matches_fractions_and_keeps_identical_content_together():
    t = table(patients_per_class=(20, 20), cells=lambda p: 50)
    t.loc[t.index[:40:2], "sha256"] = "same-content"  # 20 identical copies, all in class0
    result = make_split(t, SplitConfig(method="image"))
    share = result.table["split"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.70, abs=0.01)
    assert share["val"] == pytest.approx(0.15, abs=0.01) and share["test"] == pytest.approx(0.15, abs=0.01)
    assert result.table.loc[result.table["sha256"] == "same-content", "split"].nunique() == 1
    assert groups_in_several_parts(result.table, "split", "sha256") == []


def test_kfold_is_grouped_and_stratified():
    result = make_split(table(patients_per_class=(10, 10, 10)), SplitConfig(method="kfold", folds=5))
    t = result.table
    assert set(t["fold"]) == set(range(5))
    assert groups_in_several_parts(t, "fold") == []
    assert (t.groupby("label")["fold"].nunique() == 5).all()


def test_too_few_patients_shows_the_best_feasible_split():
    t = table(patients_per_class=(8, 2))
    with pytest.raises(SplitError, match=r"(?s)class1 missing from val.*Best feasible split") as err:
        make_split(t, SplitConfig())
    assert "test" in str(err.value) and "groups" in str(err.value)
    result = make_split(t, SplitConfig(allow_incomplete=True))
    assert result.missing == [("class1", "val")]
    assert set(result.table.loc[result.table["label"] == "class1", "split"]) == {"train", "test"}


def test_patient_split_needs_patient_ids():
    t = table().assign(patient=None)
    with pytest.raises(SplitError, match="no patient id.*--method image"):
        make_split(t, SplitConfig())


def test_image_split_keeps_the_same_pixels_in_other_files_together():
    t = table()
    t["pixels_sha256"] = t["sha256"].str.split("-").str[:2].str.join("-")  # one picture per patient, many files
    t.loc[::7, "pixels_sha256"] = None  # not decoded when indexed: their bytes decide
    result = make_split(t, SplitConfig(method="image")).table
    assert result.dropna(subset=["pixels_sha256"]).groupby("pixels_sha256")["split"].nunique().max() == 1


def cohorts(sites=("siteA", "siteB", "siteC"), patients=4, cells=3, classes=("blast", "lymph"), patient=True):
    rows = [{"label": c, "patient": f"{s}-{c}-p{p}" if patient else None, "cohort": s, "sha256": f"{s}{c}{p}{i}",
             "pixels_sha256": None}
            for s in sites for c in classes for p in range(patients) for i in range(cells)]
    return pd.DataFrame(rows)


def test_cohort_split_tests_on_the_named_cohorts_and_validates_inside_the_others_by_patient():
    t = cohorts()
    result = make_split(t, SplitConfig(method="cohort", test_cohorts=("siteC",), val=0.25, train=0.6, test=0.15))
    out = result.table
    assert set(out.loc[out["cohort"] == "siteC", "split"]) == {"test"}
    assert set(out.loc[out["cohort"] != "siteC", "split"]) == {"train", "val"}
    assert groups_in_several_parts(out, "split") == []
    assert result.record == {"train_cohorts": ["siteA", "siteB"], "val_within": "patient"}


def test_cohort_split_with_val_cohorts_and_patient_free_training_cohorts():
    named = make_split(cohorts(), SplitConfig(method="cohort", test_cohorts=("siteC",), val_cohorts=("siteB",)))
    assert named.table.groupby("cohort")["split"].unique().map(list).to_dict() == {
        "siteA": ["train"], "siteB": ["val"], "siteC": ["test"]}
    t = cohorts(("pbc",), patients=10, patient=False)
    t = pd.concat([t, cohorts(("apl",), patients=2)], ignore_index=True)
    split = make_split(t, SplitConfig(method="cohort", test_cohorts=("apl",))).table
    pbc = split[split["cohort"] == "pbc"]
    assert set(pbc["split"]) == {"train", "val"}  # grouped by image: no patients to group by
    assert 0.05 < (pbc["split"] == "val").mean() < 0.3


def test_cohort_split_refuses_unknown_cohorts_and_classes_only_held_out():
    with pytest.raises(SplitError, match="no cohort 'siteX'.*siteA, siteB, siteC"):
        make_split(cohorts(), SplitConfig(method="cohort", test_cohorts=("siteX",)))
    t = cohorts()
    t.loc[t["cohort"] == "siteC", "label"] = "promyelocyte"
    with pytest.raises(SplitError, match=r"no training cells would be left of class promyelocyte \(only in held-out "
                                         r"cohort\(s\) siteC\)"):
        make_split(t, SplitConfig(method="cohort", test_cohorts=("siteC",)))
    with pytest.raises(SplitError, match="none is left to train on"):
        make_split(cohorts(("a", "b")), SplitConfig(method="cohort", test_cohorts=("a",), val_cohorts=("b",)))


def test_cohort_settings_are_checked_where_they_are_set():
    with pytest.raises(ValueError, match="needs the test cohorts"):
        SplitConfig(method="cohort")
    with pytest.raises(ValueError, match="both for test and for val"):
        SplitConfig(method="cohort", test_cohorts=("a",), val_cohorts=("a",))
    with pytest.raises(ValueError, match="belong to method cohort"):
        SplitConfig(method="patient", test_cohorts=("a",))


def test_all_puts_every_row_in_training():
    result = make_split(cohorts(), SplitConfig(method="all"))
    assert set(result.table["split"]) == {"train"} and result.record["train_cohorts"] == ["siteA", "siteB", "siteC"]


def test_cohort_protocol_is_named_in_words():
    from aml_rapids.evaluate.report import split_protocol

    record = {**SplitConfig(method="cohort", test_cohorts=("deepapl144",)).model_dump(),
              "train_cohorts": ["pbc144"], "val_within": "image"}
    assert split_protocol(record) == ("cohort-level: trained on pbc144, tested on deepapl144 (val held out of the "
                                      "training cohorts, grouped by image)")
    assert split_protocol({"method": "all"}) == "every row in training, nothing held out"


def test_same_named_patients_of_two_cohorts_are_two_patients():
    t = cohorts(("siteA", "siteB"), patients=6)
    t["patient"] = t["label"] + "-p" + (t.index % 6 // 3).astype(str)  # p0..p1 under each class, in both cohorts
    out = make_split(t, SplitConfig(method="patient", train=0.5, val=0.25, test=0.25, allow_incomplete=True)).table
    parts = out.groupby(["cohort", "patient"])["split"].first().unstack("cohort")
    assert (parts["siteA"] != parts["siteB"]).any()  # with one key per name they could never differ
    folds = make_split(t, SplitConfig(method="kfold", folds=2)).table
    assert folds.groupby(["cohort", "patient"])["fold"].nunique().max() == 1


def test_training_cohorts_with_and_without_patients_keep_each_patient_whole():
    t = pd.concat([cohorts(("withp",), patients=8, cells=5), cohorts(("nop",), patients=8, patient=False),
                   cohorts(("test",), patients=2)], ignore_index=True)
    result = make_split(t, SplitConfig(method="cohort", test_cohorts=("test",), val=0.3))
    out = result.table
    assert groups_in_several_parts(out[out["cohort"] == "withp"], "split") == []
    assert set(out.loc[out["cohort"] != "test", "split"]) == {"train", "val"}
    assert result.record["val_within"] == "patient, else image"
