"""Shared fixtures: tiny images written on the fly, and the real data in ../shared when it is there."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_image(path: Path, size: int = 16, color=(200, 100, 150), mode: str = "RGB", fmt: str | None = None) -> Path:
    """A small solid image with a little noise (so contents differ), saved under ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    pixels = np.clip(np.array(color)[None, None, :] + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)
    return path


def python_blocks(page: Path) -> list[str]:
    """The ```python code blocks of a Markdown page, in order: documentation examples that tests run."""
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)
    assert blocks, f"{page} has no python examples"
    return blocks


@pytest.fixture(scope="session", autouse=True)
def engine_cache(tmp_path_factory):
    """Converted models and ``auto``'s choices in one folder of the test session: tests never read or fill the
    user's cache, and one conversion serves every test of the session."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AML_RAPIDS_CACHE", str(tmp_path_factory.mktemp("aml-rapids-cache")))
        yield


@pytest.fixture
def tiny_tree(tmp_path: Path) -> Path:
    """``<class>/<patient>/<image>.tif``: 3 classes x 4 patients x 5 images of 16x16."""
    root = tmp_path / "tree"
    for c, label in enumerate(["a", "b", "c"]):
        for p in range(4):
            for i in range(5):
                write_image(root / label / f"{label}_p{p}" / f"img{i}.tif", color=(60 * c + 40, 100 + 10 * p, 150 + i))
    return root


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA
