"""Training-time augmentation that imitates other acquisitions.

The held-out test data of this set was acquired apart from the training split and is shifted
from it (see ``shared/data/README.md``), so augmentation aims at what differs between
acquisitions: field of view (crop and zoom, small shifts and rotations), exposure and
processing (contrast, brightness, gamma), sharpness (blur) and detector noise. Operates on a
batch of grey images (N, H, W, 1) in [0, 255]; never part of the saved model.

This is the augmentation the shipped model was trained with. A wider variant (zoom-out with a
black border, gamma 0.5-2, Gaussian blur to sigma 2, JPEG recompression q20-95, noise to 8)
was trained with the same schedule and measured with ``training/robustness.py`` on the same
validation split: validation AUC 0.9909 vs 0.9916, specificity at the 98%-sensitivity
threshold 0.916 vs 0.948, and under the ten simulated shifts mean specificity 0.871 vs 0.873,
worst 0.681 vs 0.749 (better under blur and black border, worse under zoom-in and contrast).
It was not better, so it was not kept.
"""

from __future__ import annotations

from typing import Any


def make_augmenter(seed: int) -> Any:
    """A callable ``(images, training=True) -> images`` for (N, H, W, 1) float32 batches."""
    import keras
    import tensorflow as tf

    geometric = keras.Sequential(
        [
            keras.layers.RandomZoom((-0.15, 0.10), fill_mode="nearest", seed=seed),
            keras.layers.RandomTranslation(0.05, 0.05, fill_mode="nearest", seed=seed + 1),
            keras.layers.RandomRotation(0.03, fill_mode="nearest", seed=seed + 2),
        ],
        name="geometric",
    )
    gen = tf.random.Generator.from_seed(seed + 3)
    blur_kernel = tf.constant(
        [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=tf.float32
    )[:, :, None, None] / 16.0

    def augment(images: Any) -> Any:
        x = geometric(images, training=True)
        n = tf.shape(x)[0]
        # contrast about the image mean, then brightness, then gamma (per image)
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        contrast = gen.uniform([n, 1, 1, 1], 0.7, 1.3)
        x = (x - mean) * contrast + mean
        x = x + gen.uniform([n, 1, 1, 1], -20.0, 20.0)
        x = tf.clip_by_value(x, 0.0, 255.0)
        gamma = tf.exp(gen.uniform([n, 1, 1, 1], -0.4, 0.4))
        x = 255.0 * tf.pow(x / 255.0 + 1e-6, gamma)
        # blur a third of the images, add detector-like noise to all
        blurred = tf.nn.conv2d(x, blur_kernel, strides=1, padding="SAME")
        use_blur = gen.uniform([n, 1, 1, 1]) < 0.33
        x = tf.where(use_blur, blurred, x)
        x = x + gen.normal(tf.shape(x)) * gen.uniform([n, 1, 1, 1], 0.0, 6.0)
        return tf.clip_by_value(x, 0.0, 255.0)

    return augment
