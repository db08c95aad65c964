"""One DALI graph for both devices: decode -> HSV mask -> resize (or one warp: augment + resize) -> normalise.

On a GPU, decoding uses ``device="mixed"`` and everything after it runs on the GPU; without one, the same graph
runs in DALI's CPU-only mode (``device_id=None``). Reader labels carry the row position in the loader's table,
so labels can never shift: the consumer looks rows up by position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

from ..config import SegmentationConfig
from .hsv import hsv_mask

READER = "reader"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Normalization:
    """Mean and std on RGB in [0, 1], as torchvision's Normalize takes them."""

    mean: tuple[float, float, float] = IMAGENET[0]
    std: tuple[float, float, float] = IMAGENET[1]


PIXELS = Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # RGB in [0, 1]: each network normalises its own copy


@dataclass(frozen=True)
class GraphSpec:
    """Everything the graph depends on besides the file list."""

    image_size: int
    segmentation: SegmentationConfig
    normalizations: dict[str, Normalization]
    gpu: bool
    output_dtype: types.DALIDataType
    gpu_decode: bool
    debug: bool = False


def _resize(image, size: int):
    return fn.resize(image, size=[size, size], interp_type=types.INTERP_LINEAR)


class _MatrixBatches:
    """Feeds each reader batch its rows' affine matrices, in reader order, as one (batch, 2, 3) array, the last
    batch padded as the reader pads it, starting over at each epoch as the reader does."""

    def __init__(self, matrices: np.ndarray, batch_size: int):
        pad = -len(matrices) % batch_size
        padded = np.concatenate([matrices, np.repeat(matrices[-1:], pad, axis=0)])
        self.batches = np.split(np.ascontiguousarray(padded, dtype=np.float32), len(padded) // batch_size)

    def __iter__(self):
        return iter(self.batches)


def cell_graph(files: list[str], positions: list[int], spec: GraphSpec, matrices: np.ndarray | None,
               batch_size: int):
    """The pipeline body; outputs one tensor per normalisation, then the row positions (and debug views)."""
    encoded, position = fn.readers.file(files=files, labels=positions, random_shuffle=False, pad_last_batch=True,
                                        name=READER)
    mixed = spec.gpu and spec.gpu_decode
    decoded = fn.decoders.image(encoded, device="mixed" if mixed else "cpu", output_type=types.RGB)
    if spec.gpu and not mixed:
        decoded = decoded.gpu()
    image = decoded
    mask = None
    if spec.segmentation.enabled:
        mask = hsv_mask(decoded, spec.segmentation)
        image = decoded * mask
    segmented = image
    augmenting = matrices is not None
    if augmenting:
        # One resampling: the row's matrix holds the augmentation and the resize to image_size. No fill value:
        # DALI then clamps at the border as the resize does, so a warp that changes nothing equals the resize.
        matrix = fn.external_source(source=_MatrixBatches(matrices, batch_size), cycle=True, dtype=types.FLOAT)
        image = fn.warp_affine(image, matrix=matrix, size=[spec.image_size, spec.image_size],
                               interp_type=types.INTERP_LINEAR, inverse_map=False)
    else:
        image = _resize(image, spec.image_size)
    outputs = [
        fn.crop_mirror_normalize(image, dtype=spec.output_dtype, output_layout="CHW",
                                 mean=[255.0 * m for m in norm.mean], std=[255.0 * s for s in norm.std])
        for norm in spec.normalizations.values()
    ]
    outputs.append(position)
    if spec.debug:
        resized = _resize(segmented, spec.image_size) if augmenting else image
        outputs += [decoded, mask if mask is not None else decoded[:, :, 0:1] * 0 + 1, resized, image]
    return tuple(outputs)


def build_pipeline(files, positions, spec: GraphSpec, matrices: np.ndarray | None, batch_size: int,
                   num_threads: int, device_id: int | None, prefetch: int):
    """A built DALI pipeline for the given files; ``device_id=None`` is DALI's CPU-only mode; ``matrices``
    (one 2x3 affine per file, or None for no augmentation) come from ``loader.augment``."""
    # Either executor leaves each batch valid for as long as its consumer holds it: the dynamic one hands its
    # own buffers over (no copy: faster on a CPU), the other is copied into torch tensors (as tested on a GPU,
    # where the copy cost nothing measurable). docs/loader.md has the numbers.
    pipe = pipeline_def(cell_graph, batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                        prefetch_queue_depth=prefetch, exec_dynamic=device_id is None)(files, positions, spec,
                                                                                       matrices, batch_size)
    pipe.build()
    return pipe


def output_names(spec: GraphSpec) -> list[str]:
    names = [f"image_{name}" for name in spec.normalizations] + ["position"]
    return names + (["decoded", "mask", "resized", "augmented"] if spec.debug else [])
