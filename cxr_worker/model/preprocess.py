"""The preprocessing contract shared by training, ``evaluate``, ``score`` and the service.

The model was trained on the Kermany images, which are *whole* radiographs squashed to
224x224 (aspect ratio not kept) and stored as grey JPEG. Every path into the model therefore
goes through :func:`to_model_input`:

1. a 2-D grey image of *display values* in [0, 255] (MONOCHROME2 sense: bone is bright),
   float; how a DICOM gets there is the decode stage's business (``cxr_worker.decode``);
2. the whole image resized to 224x224 without keeping the aspect ratio, with Pillow's
   antialiased bilinear filter on float data (no 8-bit rounding on the way);
3. grey replicated to three channels, float32, still in [0, 255].

The scaling to MobileNetV2's [-1, 1] range is a ``Rescaling`` layer *inside* the saved graph
(see :mod:`cxr_worker.model.architecture`), so no caller can forget or repeat it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

INPUT_SIZE = 224
"""Side of the square model input, in pixels."""


def to_model_input(grey: NDArray[np.floating] | NDArray[np.integer]) -> NDArray[np.float32]:
    """Squash a grey display image (values 0..255) to the model's (224, 224, 3) float32 input."""
    if grey.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {grey.shape}")
    if min(grey.shape) < 1:
        raise ValueError("empty image")
    img = np.asarray(grey, dtype=np.float32)
    if img.shape != (INPUT_SIZE, INPUT_SIZE):
        resized = Image.fromarray(img, mode="F").resize(
            (INPUT_SIZE, INPUT_SIZE), resample=Image.Resampling.BILINEAR
        )
        img = np.asarray(resized, dtype=np.float32)
    img = np.clip(img, 0.0, 255.0)
    return np.repeat(img[:, :, None], 3, axis=2)


def load_grey_image(path: str | Path) -> NDArray[np.uint8]:
    """Read a PNG/JPEG file as 8-bit grey display values (colour: ITU-R 601-2 luma)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)
