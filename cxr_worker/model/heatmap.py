"""Grad-CAM from the served model, in NumPy: no TensorFlow in the service.

Each member's TFLite file has two outputs (written by
:func:`cxr_worker.training.finalize.export_heatmap`): the probability and ``features``, the
last convolutional feature map of MobileNetV2 (``out_relu``, 7x7xC). The head after it is
small and is stored beside the network as ``memberN_head.npz`` (the same weights as the Keras
file, checked against the TFLite probability by the tests):

    global average pooling -> Dense(100, relu) -> Dropout (identity at inference)
    -> Dense(50, relu) -> Dense(1) = logit -> sigmoid

so the gradient of the logit with respect to the feature map is computed analytically
(:func:`channel_weights`). Grad-CAM (Selvaraju et al. 2017), as
:func:`cxr_worker.training.gradcam.gradcam` computes it with TensorFlow on the Keras model:
channel weights = spatial mean of the gradient; map = ReLU(sum_k w_k A_k); divided by its
maximum; bilinear upsampling to 224x224 (Pillow, as there); clipped to [0, 1].

The gradient is taken of the logit, not of the sigmoid output that the TensorFlow version
differentiates: the two differ by the positive factor s(1 - s) for all channels alike, which
the division by the maximum removes, and the logit's gradient does not vanish when a float32
sigmoid saturates at 1.0 (the map would be blank exactly when the model is most sure).

For an ensemble the members' weighted maps (before the ReLU) are averaged, as their logits are.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from cxr_worker.model.preprocess import INPUT_SIZE

FEATURES_OUTPUT = "features"
"""Name of the feature-map output tensor in a member's TFLite file."""

HEAD_KEYS = ("kernel_0", "bias_0", "kernel_1", "bias_1", "kernel_2", "bias_2")
"""Arrays in a head file: Dense layers in order (kernel (in, out), bias (out,)); ReLU after
every layer but the last, whose single output is the logit."""

FloatArray = NDArray[np.float32]


@dataclass(frozen=True)
class Head:
    """The dense layers after global average pooling (float64 copies of the float32 weights)."""

    kernels: tuple[NDArray[np.float64], ...]
    biases: tuple[NDArray[np.float64], ...]

    @classmethod
    def from_arrays(cls, arrays: dict[str, NDArray[np.floating]]) -> Head:
        n = len(HEAD_KEYS) // 2
        kernels = tuple(np.asarray(arrays[f"kernel_{i}"], np.float64) for i in range(n))
        biases = tuple(np.asarray(arrays[f"bias_{i}"], np.float64).ravel() for i in range(n))
        width = kernels[0].shape[0]
        for k, b in zip(kernels, biases, strict=True):
            if k.ndim != 2 or k.shape[0] != width or b.shape != (k.shape[1],):
                raise ValueError(f"head layer shapes do not chain: {k.shape}, {b.shape}")
            width = k.shape[1]
        if width != 1:
            raise ValueError(f"the head ends in {width} outputs, not one logit")
        return cls(kernels, biases)

    @classmethod
    def load(cls, path: str | Path) -> Head:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in HEAD_KEYS if k not in npz.files]
            if missing:
                raise ValueError(f"{Path(path).name} lacks {missing}")
            return cls.from_arrays({k: npz[k] for k in HEAD_KEYS})

    @property
    def channels(self) -> int:
        return int(self.kernels[0].shape[0])

    def logit(self, features: NDArray[np.floating]) -> float:
        """The network's logit from its feature map (H, W, C): the served score's pre-sigmoid
        value, recomputed (a check that the head file belongs to the network)."""
        h = np.asarray(features, np.float64).mean(axis=(0, 1))
        last = len(self.kernels) - 1
        for i, (k, b) in enumerate(zip(self.kernels, self.biases, strict=True)):
            h = h @ k + b
            if i < last:
                h = np.maximum(h, 0.0)
        return float(h[0])

    def channel_weights(self, features: NDArray[np.floating]) -> NDArray[np.float64]:
        """Grad-CAM's weights: the spatial mean of d(logit)/d(features), shape (C,).

        Back-propagated by hand: through the last Dense (its kernel), each ReLU (its mask,
        derivative 0 where the input is <= 0, as TensorFlow's), each Dense (transposed kernel)
        and the pooling (1/(H*W) for every position, so the gradient is the same at each
        position and its spatial mean is that value).
        """
        h_w = features.shape[0] * features.shape[1]
        h = np.asarray(features, np.float64).mean(axis=(0, 1))
        masks = []
        last = len(self.kernels) - 1
        for i, (k, b) in enumerate(zip(self.kernels, self.biases, strict=True)):
            h = h @ k + b
            if i < last:
                masks.append(h > 0)
                h = np.maximum(h, 0.0)
        grad = self.kernels[last][:, 0]
        for i in range(last - 1, -1, -1):
            grad = self.kernels[i] @ (grad * masks[i])
        weights: NDArray[np.float64] = grad / h_w
        return weights


def weighted_map(features: NDArray[np.floating], head: Head) -> NDArray[np.float64]:
    """sum_k w_k A_k over the channels of one member's feature map (H, W, C), before the ReLU."""
    feats = np.asarray(features, np.float64)
    if feats.ndim == 4:
        feats = feats[0]
    if feats.ndim != 3 or feats.shape[-1] != head.channels:
        raise ValueError(f"feature map {feats.shape} does not fit a head of {head.channels} "
                         "channels")
    out: NDArray[np.float64] = feats @ head.channel_weights(feats)
    return out


def finish(grid: NDArray[np.floating], size: int = INPUT_SIZE) -> FloatArray:
    """ReLU, divide by the maximum (an all-zero map stays zero), bilinear upsampling to
    ``size`` x ``size`` and clip to [0, 1]: the steps of the TensorFlow Grad-CAM."""
    cam = np.maximum(np.asarray(grid, np.float64), 0.0)
    top = cam.max()
    if top > 0:
        cam = cam / top
    img = Image.fromarray(cam.astype(np.float32), mode="F").resize(
        (size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def gradcam(features: list[NDArray[np.floating]], heads: list[Head],
            size: int = INPUT_SIZE) -> FloatArray:
    """The heatmap in [0, 1], ``size`` x ``size``, from each member's feature map and head."""
    if not features or len(features) != len(heads):
        raise ValueError("one feature map per head is needed")
    grids = [weighted_map(f, h) for f, h in zip(features, heads, strict=True)]
    return finish(np.mean(grids, axis=0), size)


# -- the stored form: 8-bit grey PNG, 224x224 ----------------------------------------------
def to_uint8(heat: NDArray[np.floating]) -> NDArray[np.uint8]:
    """[0, 1] -> 0..255 (rounded)."""
    out: NDArray[np.uint8] = np.rint(np.clip(heat, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def png_bytes(heat: NDArray[np.floating] | NDArray[np.uint8]) -> bytes:
    """The heatmap as an 8-bit grey PNG (what is persisted beside a result)."""
    arr = heat if heat.dtype == np.uint8 else to_uint8(heat.astype(np.float32))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def load_png(path_or_bytes: str | Path | bytes) -> FloatArray:
    """A persisted heatmap (8-bit grey PNG) back as floats in [0, 1]."""
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(src) as im:
        arr = np.asarray(im.convert("L"), dtype=np.float32)
    out: FloatArray = arr / np.float32(255.0)
    return out
