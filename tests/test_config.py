from pathlib import Path

import pytest
import yaml

from aml_rapids.config import RunConfig, dump_config, load_config
from aml_rapids.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_default_yaml_is_the_built_in_default():
    assert load_config(REPO / "configs" / "default.yaml") == RunConfig()
    assert yaml.safe_load(dump_config(RunConfig())) == yaml.safe_load((REPO / "configs" / "default.yaml").read_text())


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["split.seed=7", "split.method=kfold", "index.verify_decode=false"])
    assert (cfg.split.seed, cfg.split.method, cfg.index.verify_decode) == (7, "kfold", False)


def test_file_then_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("split:\n  seed: 3\n  method: image\n")
    cfg = load_config(path, ["split.seed=4"])
    assert (cfg.split.seed, cfg.split.method) == (4, "image")


@pytest.mark.parametrize("overrides, words", [
    (["split.sede=3"], "split.sede"),
    (["split.method=random"], "split.method"),
    (["split.train=0.9"], "sum to 1"),
    (["split.seed"], "section.key=value"),
])
def test_bad_overrides_name_the_key(overrides, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(None, overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("split: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)


def test_store_chunks_hold_whole_batches():
    assert load_config(None, ["features.chunk_batches=3", "loader.batch_size=64"]).chunk_rows == 192
