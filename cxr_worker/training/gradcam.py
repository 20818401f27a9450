"""Grad-CAM on the last convolutional block of MobileNetV2 (``out_relu``).

Needs the Keras model (not the TFLite one): the reference for the service's NumPy Grad-CAM on
the TFLite model's feature map (:mod:`cxr_worker.model.heatmap`), which the tests hold equal
to this one.

The gradient is that of the logit (the last Dense layer before its sigmoid), not of the
sigmoid output: the two differ by the positive factor s(1 - s), which the division by the
maximum removes, but in float32 the sigmoid saturates at exactly 1.0 for a logit above about
17 and its gradient is then 0, which made the map blank for the surest pneumonias.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image


def gradcam(model: Any, x: NDArray[np.float32]) -> NDArray[np.float32]:
    """Heatmap in [0, 1], shape (224, 224), for one contract input (224, 224, 3)."""
    import tensorflow as tf

    backbone = model.get_layer("mobilenetv2")
    head = [model.get_layer(n) for n in ("pool", "fc100", "dropout", "fc50")]
    out = model.get_layer("pneumonia")
    rescale = model.get_layer("to_unit_range")
    with tf.GradientTape() as tape:
        feats = backbone(rescale(tf.convert_to_tensor(x[None])), training=False)
        tape.watch(feats)
        y = feats
        for layer in head:
            y = layer(y, training=False)
        logit = tf.matmul(y, tf.convert_to_tensor(out.kernel)) + tf.convert_to_tensor(out.bias)
        score = logit[:, 0]
    grads = tape.gradient(score, feats)[0]
    weights = tf.reduce_mean(grads, axis=(0, 1))
    cam = tf.nn.relu(tf.reduce_sum(feats[0] * weights, axis=-1)).numpy()
    if cam.max() > 0:
        cam = cam / cam.max()
    img = Image.fromarray(cam.astype(np.float32), mode="F").resize(
        (x.shape[1], x.shape[0]), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def overlay(grey: NDArray[np.floating], heat: NDArray[np.floating], alpha: float = 0.4
            ) -> NDArray[np.uint8]:
    """RGB overlay of a heatmap (any size; resized) on a grey display image (0..255)."""
    h, w = grey.shape
    heat_img = Image.fromarray(np.asarray(heat, np.float32), mode="F").resize(
        (w, h), Image.Resampling.BILINEAR)
    hm = np.clip(np.asarray(heat_img), 0, 1)
    # a simple "jet"-like ramp: blue -> green -> red
    colour = np.stack([np.clip(1.5 - abs(4 * hm - 3), 0, 1), np.clip(1.5 - abs(4 * hm - 2), 0, 1),
                       np.clip(1.5 - abs(4 * hm - 1), 0, 1)], axis=-1) * 255
    base = np.repeat(np.clip(grey, 0, 255)[..., None], 3, axis=-1)
    a = alpha * hm[..., None]
    out: NDArray[np.uint8] = np.clip(base * (1 - a) + colour * a, 0, 255).astype(np.uint8)
    return out
