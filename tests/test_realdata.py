"""The shared real datasets index to the documented counts, and split without leaking patients."""

import pytest

from aml_rapids.config import IndexConfig, SplitConfig
from aml_rapids.data.manifest import build_manifest, summarize
from aml_rapids.data.splits import groups_in_several_parts, make_split

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


@pytest.fixture(scope="module")
def deepapl(request):
    from conftest import SHARED_DATA
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return build_manifest(SHARED_DATA / "deepapl144" / "manifest.csv", IndexConfig())


def test_deepapl_counts(deepapl):
    assert summarize(deepapl.manifest)["cells"] == 20235
    assert summarize(deepapl.manifest)["patients"] == 82
    assert summarize(deepapl.manifest)["per_class"] == {"AML": 11493, "APL": 8742}
    assert not deepapl.problems and "cell_type" in deepapl.manifest.table


def test_deepapl_patient_split_has_no_leak_and_every_class_everywhere(deepapl):
    t = make_split(deepapl.manifest.table, SplitConfig(method="patient", seed=0)).table
    assert groups_in_several_parts(t, "split") == []
    assert (t.groupby("split")["label"].nunique() == 2).all() and set(t["split"]) == {"train", "val", "test"}


def test_pbc_counts_and_the_one_cross_class_copy(shared_data):
    result = build_manifest(shared_data / "pbc144", IndexConfig())
    summary = summarize(result.manifest)
    assert result.found == 17092 and summary["classes"] == 8
    rejected = sorted(p.path.split("pbc144/")[1] for p in result.problems)
    assert rejected == ["eosinophil/EO_225902.jpg", "neutrophil/BNE_191112.jpg"]
    assert summary["cells"] == 17090
