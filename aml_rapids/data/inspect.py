"""Read one image file once: size, content hash, header fields, and (optionally) a full decode check."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# Pixel modes the loader turns into 8-bit RGB with a defined meaning (gray is replicated, alpha dropped,
# 16-bit scaled by 1/257, palettes expanded). Float and 32-bit integer images have no agreed 8-bit range.
SUPPORTED_MODES = frozenset({"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "I;16", "I;16B", "I;16L"})


@dataclass(frozen=True)
class ImageInfo:
    """What the manifest records about one readable image."""

    bytes: int
    sha256: str
    mtime_ns: int  # when the content read was last modified: the loader's cheap "changed since indexing?" test
    pixels_sha256: str | None  # of the decoded pixels (with verify_decode): a re-saved copy has the same one
    width: int
    height: int
    mode: str
    format: str


class ImageProblem(Exception):
    """An image file that cannot be used; the message says why."""


def inspect_image(path: Path, verify_decode: bool = True) -> ImageInfo:
    """Hash the file and read its header; with ``verify_decode`` decode all pixels to catch truncation.

    Raises ImageProblem with a reason a person can act on.
    """
    try:
        with open(path, "rb") as file:
            data, mtime_ns = file.read(), os.fstat(file.fileno()).st_mtime_ns
    except OSError as exc:
        raise ImageProblem(f"cannot read file: {exc.strerror or exc}") from None
    if not data:
        raise ImageProblem("empty file (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height, mode, fmt = img.width, img.height, img.mode, img.format or "?"
            if getattr(img, "n_frames", 1) > 1:
                raise ImageProblem(f"multi-page {fmt} ({img.n_frames} frames); one cell per file expected")
            if mode not in SUPPORTED_MODES:
                raise ImageProblem(f"pixel mode {mode!r} has no defined 8-bit RGB conversion")
            pixels = None
            if verify_decode:
                img.load()
                pixels = hashlib.sha256(f"{mode} {width}x{height}\n".encode() + img.tobytes()).hexdigest()
    except UnidentifiedImageError:
        raise ImageProblem("not an image: content is not TIFF, PNG, JPEG or BMP") from None
    except ImageProblem:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageProblem(f"truncated or corrupt image data ({exc})") from None
    except Exception as exc:  # a decoder's own failure on an odd header (struct.error, IndexError, a bomb, ...)
        raise ImageProblem(f"cannot be decoded ({type(exc).__name__}: {exc})") from None
    return ImageInfo(len(data), digest, mtime_ns, pixels, width, height, mode, fmt)
