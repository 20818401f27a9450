"""Training-time augmentation modelled on real acquisition differences.

The held-out test data of this set was acquired apart from the training split and is shifted
from it (see ``shared/data/README.md``), so augmentation imitates what differs between
acquisitions and sites, applied to the raw squashed image *before* the preprocessing
contract's histogram equalisation (which itself removes monotonic exposure changes):

- field of view: zoom in and out, small shifts, rotation up to ~11 degrees;
- collimation: a black margin of random width on some sides (a third of the images);
- exposure and processing: contrast, brightness, gamma 0.5-2, edge enhancement (unsharp mask,
  as CR/DX processing does), blur up to sigma ~2;
- detector noise up to sigma 10 grey levels;
- export: JPEG recompression at quality 20-95 (a quarter of the images);
- burned-in annotation: bright side markers and text bars (a third of the images).

Operates on a batch of grey images (N, H, W, 1) in [0, 255]; never part of the saved model.
"""

from __future__ import annotations

from typing import Any


def make_augmenter(seed: int) -> Any:
    """A callable ``images -> images`` for (N, H, W, 1) float32 batches in [0, 255]."""
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
    b = tf.constant([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0  # binomial, sigma ~1 per pass
    blur_kernel = (b[:, None] * b[None, :])[:, :, None, None]

    def blur(x: Any) -> Any:
        return tf.nn.conv2d(x, blur_kernel, strides=1, padding="SAME")

    def per_image(n: Any, lo: float, hi: float) -> Any:
        return gen.uniform([n, 1, 1, 1], lo, hi)

    def chance(n: Any, p: float) -> Any:
        return gen.uniform([n, 1, 1, 1]) < p

    def collimate(x: Any, n: Any, h: Any, w: Any) -> Any:
        rows = tf.cast(tf.range(h), tf.float32)[None, :, None, None] / tf.cast(h, tf.float32)
        cols = tf.cast(tf.range(w), tf.float32)[None, None, :, None] / tf.cast(w, tf.float32)
        top, bottom = per_image(n, 0.0, 0.12), per_image(n, 0.0, 0.12)
        left, right = per_image(n, 0.0, 0.12), per_image(n, 0.0, 0.12)
        inside = ((rows >= top) & (rows < 1.0 - bottom) & (cols >= left) & (cols < 1.0 - right))
        return tf.where(chance(n, 0.33) & ~inside, tf.zeros_like(x), x)

    def burn_in(x: Any, n: Any, h: Any, w: Any) -> Any:
        rows = tf.cast(tf.range(h), tf.float32)[None, :, None, None] / tf.cast(h, tf.float32)
        cols = tf.cast(tf.range(w), tf.float32)[None, None, :, None] / tf.cast(w, tf.float32)
        out = x
        for _ in range(2):  # a side marker and a text bar
            r0, c0 = per_image(n, 0.0, 0.9), per_image(n, 0.0, 0.85)
            rh, cw = per_image(n, 0.02, 0.08), per_image(n, 0.03, 0.15)
            box = (rows >= r0) & (rows < r0 + rh) & (cols >= c0) & (cols < c0 + cw)
            out = tf.where(chance(n, 0.33) & box, per_image(n, 200.0, 255.0) + 0 * x, out)
        return out

    def jpeg(x: Any, n: Any) -> Any:
        def one(img: Any) -> Any:
            q = tf.random.uniform([], 20, 96, dtype=tf.int32)
            u8 = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
            return tf.cast(tf.image.adjust_jpeg_quality(u8, q), tf.float32)

        return tf.where(chance(n, 0.25), tf.map_fn(one, x), x)

    def augment(images: Any) -> Any:
        x = geometric(images, training=True)
        shape = tf.shape(x)
        n, h, w = shape[0], shape[1], shape[2]
        x = collimate(x, n, h, w)
        # contrast about the image mean, brightness, gamma 0.5-2 (per image)
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        x = (x - mean) * per_image(n, 0.6, 1.5) + mean + per_image(n, -30.0, 30.0)
        x = tf.clip_by_value(x, 0.0, 255.0)
        x = 255.0 * tf.pow(x / 255.0 + 1e-6, tf.exp(per_image(n, -0.7, 0.7)))
        # sharpness: a third edge-enhanced, a third blurred by 1-4 passes (sigma ~1-2)
        b1 = blur(x)
        sharpened = x + per_image(n, 0.3, 1.5) * (x - b1)
        b2 = blur(b1)
        b4 = blur(blur(b2))
        passes = gen.uniform([n, 1, 1, 1])
        blurred = tf.where(passes < 0.33, b1, tf.where(passes < 0.66, b2, b4))
        kind = gen.uniform([n, 1, 1, 1])
        x = tf.where(kind < 0.33, sharpened, tf.where(kind < 0.66, blurred, x))
        x = x + gen.normal(tf.shape(x)) * per_image(n, 0.0, 10.0)
        x = tf.clip_by_value(x, 0.0, 255.0)
        x = burn_in(x, n, h, w)
        return jpeg(x, n)

    return augment
