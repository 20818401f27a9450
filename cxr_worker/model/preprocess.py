"""The preprocessing contract shared by training, ``evaluate``, ``calibrate``, ``score`` and the
service.

The model was trained on the Kermany images, which are *whole* radiographs squashed to
224x224 (aspect ratio not kept) and stored as grey JPEG. Every path into the model therefore
goes through :func:`to_model_input`:

1. a 2-D grey image of *display values* in [0, 255] (MONOCHROME2 sense: bone is bright),
   float; how a DICOM gets there is the decode stage's business (``cxr_worker.decode``);
2. the whole image resized to 224x224 without keeping the aspect ratio, with Pillow's
   antialiased bilinear filter on float data (no 8-bit rounding on the way);
3. (contract version 2 only) global histogram equalisation of the 224x224 image
   (:func:`equalize`): grey levels replaced by their rank, so a monotonic change of exposure,
   contrast, gamma or window gives nearly the same input. Measured as a lever against version
   1 with the same augmentation and schedule (model card, "Levers"): validation AUC 0.988 vs
   0.992, mean specificity under the shift battery 0.78 vs 0.87, worst 0.49 (noise) vs 0.75;
   it removes intensity shifts but amplifies noise and texture. Not used by the shipped model;
   kept so that the measurement can be repeated (``--members 0.5:2``);
4. grey replicated to three channels, float32, in [0, 255].

The scaling to MobileNetV2's [-1, 1] range is a ``Rescaling`` layer *inside* the saved graph
(see :mod:`cxr_worker.model.architecture`), so no caller can forget or repeat it. The model
card records the contract version a model was trained with (``preprocessing.version``); the
scorer refuses a model whose version this code does not implement.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

INPUT_SIZE = 224
"""Side of the square model input, in pixels."""

CONTRACT_VERSION = 1
"""The default for new models. 1: squash to 224 only; 2: squash, then global histogram
equalisation (measured, not shipped)."""

SUPPORTED_VERSIONS = (1, 2)


def equalize(img: NDArray[np.floating] | NDArray[np.integer]) -> NDArray[np.float32]:
    """Global histogram equalisation of a grey image in [0, 255] (any leading batch axes).

    Values are rounded to 256 levels; level ``v`` becomes
    ``255 * (cdf(v) - cdf_min) / (n - cdf_min)``, the standard mapping (Gonzalez & Woods),
    computed per image over its last two axes. A constant image maps to 0.
    """
    arr = np.asarray(img)
    flat = np.clip(np.rint(arr), 0, 255).astype(np.uint8).reshape(-1, arr.shape[-2] * arr.shape[-1])
    out = np.empty(flat.shape, np.float32)
    for i, row in enumerate(flat):
        cdf = np.cumsum(np.bincount(row, minlength=256))
        cdf_min = cdf[row.min()]
        span = row.size - cdf_min
        lut = (255.0 * (cdf - cdf_min) / span) if span else np.zeros(256)
        out[i] = lut.astype(np.float32)[row]
    return out.reshape(arr.shape)


def to_model_input(
    grey: NDArray[np.floating] | NDArray[np.integer], version: int = CONTRACT_VERSION
) -> NDArray[np.float32]:
    """Squash a grey display image (values 0..255) to the model's (224, 224, 3) float32 input.

    ``version`` is the contract version of the model that will score the result (the model
    card's ``preprocessing.version``); the default is the current one.
    """
    if grey.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {grey.shape}")
    if min(grey.shape) < 1:
        raise ValueError("empty image")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"preprocessing contract version {version} is not implemented")
    img = np.asarray(grey, dtype=np.float32)
    if img.shape != (INPUT_SIZE, INPUT_SIZE):
        resized = Image.fromarray(img, mode="F").resize(
            (INPUT_SIZE, INPUT_SIZE), resample=Image.Resampling.BILINEAR
        )
        img = np.asarray(resized, dtype=np.float32)
    img = np.clip(img, 0.0, 255.0)
    if version >= 2:
        img = equalize(img)
    return np.repeat(img[:, :, None], 3, axis=2)


def load_grey_image(path: str | Path) -> NDArray[np.uint8]:
    """Read a PNG/JPEG file as 8-bit grey display values (colour: ITU-R 601-2 luma)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)
