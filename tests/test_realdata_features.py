"""Real features are real: ImageNet MobileNetV2 features of PBC cells separate the classes far better than
the same network with random weights, on a held-out part (logistic regression, stratified 25% test)."""

import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from aml_rapids.config import IndexConfig, load_config
from aml_rapids.data.manifest import build_manifest
from aml_rapids.features.extract import extract
from aml_rapids.features.plan import STATUS_OK
from aml_rapids.features.store import FeatureStore

from test_features import SHARED_WEIGHTS

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def held_out_accuracy(shared_data, tmp_path, weights: str, per_class: int) -> float:
    manifest = build_manifest(shared_data / "pbc144", IndexConfig(verify_decode=False)).manifest
    manifest.table = manifest.table.sample(frac=1.0, random_state=0).groupby("label").head(per_class)
    manifest.table = manifest.table.reset_index(drop=True)
    cfg = load_config(None, [f"features.backbones=[{{name: mobilenet_v2, weights: {weights}}}]",
                             "loader.batch_size=32", "features.chunk_batches=8", "loader.device=cpu",
                             "features.store_dtype=float32"])
    store_path = tmp_path / f"{weights.replace('/', '_')}.zarr"
    extract(manifest, store_path, cfg)
    store = FeatureStore.open(store_path)
    rows = store.rows()
    ok = (rows["status"] == STATUS_OK).to_numpy()
    x, y = store.features("mobilenet_v2")[:][ok], rows["label"][ok].to_numpy()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, y_train)
    return float((model.predict(x_test) == y_test).mean())


def test_random_mobilenet_features_are_refused_in_float16(shared_data, tmp_path):
    """Randomly initialised MobileNetV2 pools to |x| ~ 1e-8: float16 would store zeros, so it is refused."""
    from aml_rapids.errors import ConfigError
    manifest = build_manifest(shared_data / "pbc144", IndexConfig(verify_decode=False)).manifest
    manifest.table = manifest.table.head(8)
    cfg = load_config(None, ["features.backbones=[{name: mobilenet_v2, weights: none}]", "loader.batch_size=8",
                             "features.chunk_batches=1", "loader.device=cpu"])
    with pytest.raises(ConfigError, match="outside float16's normal range.*store_dtype=float32"):
        extract(manifest, tmp_path / "f16.zarr", cfg)


def test_imagenet_features_beat_random_features(shared_data, tmp_path):
    if not SHARED_WEIGHTS.is_file():
        pytest.skip("../shared/weights is absent")
    pretrained = held_out_accuracy(shared_data, tmp_path, str(SHARED_WEIGHTS), per_class=100)
    random_init = held_out_accuracy(shared_data, tmp_path, "none", per_class=100)
    print(f"pbc144, 800 cells, image-level held-out 25%: ImageNet {pretrained:.3f}, random {random_init:.3f}")
    assert pretrained >= 0.75 and pretrained >= random_init + 0.15
