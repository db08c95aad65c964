"""One DALI graph for both devices: decode -> HSV mask -> [stain normalisation] -> [colour / stain jitter] ->
mask -> resize (or one warp: augment + resize) -> normalise. The mask is found on the cell as decoded, so
neither normalisation nor jitter changes which pixels are cell.

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
from .augment import RowDraws
from .hsv import hsv_mask
from .stain import LabTarget, colour_jitter, reinhard, stain_jitter

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
    stain_target: LabTarget | None = None  # Reinhard normalisation of every cell to it (None: none)


def _resize(image, size: int):
    return fn.resize(image, size=[size, size], interp_type=types.INTERP_LINEAR)


class _RowBatches:
    """Feeds each reader batch its rows' values (one array per row: a matrix, a factor), in reader order, as one
    (batch, ...) array, the last batch padded as the reader pads it, starting over at each epoch as the reader
    does."""

    def __init__(self, values: np.ndarray, batch_size: int):
        pad = -len(values) % batch_size
        padded = np.concatenate([values, np.repeat(values[-1:], pad, axis=0)])
        self.batches = np.split(np.ascontiguousarray(padded, dtype=np.float32), len(padded) // batch_size)

    def __iter__(self):
        return iter(self.batches)


def _per_row(values: np.ndarray, batch_size: int):
    return fn.external_source(source=_RowBatches(values, batch_size), cycle=True, dtype=types.FLOAT)


def _ones(image):
    """An HxWx1 mask that keeps every pixel."""
    return image[:, :, 0:1] * 0 + 1


def _masked(image, mask):
    return image if mask is None else image * mask


def _jitter(image, draws: RowDraws, batch_size: int):
    """Colour, then stain jitter (those drawn) of a uint8 HWC image, before the mask blacks the background."""
    if draws.colour is not None:
        image = colour_jitter(image, [_per_row(draws.colour[:, k], batch_size) for k in range(4)])
    if draws.stain is not None:
        image = stain_jitter(image, *(_per_row(values, batch_size) for values in draws.stain))
    return image


def cell_graph(files: list[str], positions: list[int], spec: GraphSpec, draws: RowDraws | None, batch_size: int):
    """The pipeline body; outputs one tensor per normalisation, then the row positions (and debug views)."""
    encoded, position = fn.readers.file(files=files, labels=positions, random_shuffle=False, pad_last_batch=True,
                                        name=READER)
    mixed = spec.gpu and spec.gpu_decode
    decoded = fn.decoders.image(encoded, device="mixed" if mixed else "cpu", output_type=types.RGB)
    if spec.gpu and not mixed:
        decoded = decoded.gpu()
    mask = hsv_mask(decoded, spec.segmentation) if spec.segmentation.enabled else None
    normalised = decoded
    if spec.stain_target is not None:
        cell = mask is not None and spec.stain_target.region == "cell"
        normalised = reinhard(decoded, mask if cell else _ones(decoded), spec.stain_target)
    augmenting = draws is not None
    image = _masked(_jitter(normalised, draws, batch_size) if augmenting else normalised, mask)
    if augmenting:
        # One resampling: the row's matrix holds the augmentation and the resize to image_size. No fill value:
        # DALI then clamps at the border as the resize does, so a warp that changes nothing equals the resize.
        image = fn.warp_affine(image, matrix=_per_row(draws.matrices, batch_size),
                               size=[spec.image_size, spec.image_size],
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
        resized = _resize(_masked(normalised, mask), spec.image_size) if augmenting else image
        outputs += [decoded, mask if mask is not None else _ones(decoded), resized, image]
    return tuple(outputs)


def build_pipeline(files, positions, spec: GraphSpec, draws: RowDraws | None, batch_size: int,
                   num_threads: int, device_id: int | None, prefetch: int):
    """A built DALI pipeline for the given files; ``device_id=None`` is DALI's CPU-only mode; ``draws`` (each
    file's augmentation, or None for none) come from ``loader.augment``."""
    # Either executor leaves each batch valid for as long as its consumer holds it: the dynamic one hands its
    # own buffers over (no copy: faster on a CPU), the other is copied into torch tensors (as tested on a GPU,
    # where the copy cost nothing measurable). docs/loader.md has the numbers.
    pipe = pipeline_def(cell_graph, batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                        prefetch_queue_depth=prefetch, exec_dynamic=device_id is None)(files, positions, spec,
                                                                                       draws, batch_size)
    pipe.build()
    return pipe


def output_names(spec: GraphSpec) -> list[str]:
    names = [f"image_{name}" for name in spec.normalizations] + ["position"]
    return names + (["decoded", "mask", "resized", "augmented"] if spec.debug else [])
