"""The reference architecture: MobileNetV2 (ImageNet) -> GAP -> Dense(100) -> Dropout(0.6)
-> Dense(50) -> Dense(1, sigmoid).

Imports Keras; only training, evaluation, Grad-CAM and tests import this module.
"""

from __future__ import annotations

from typing import Any

from cxr_worker.model.preprocess import INPUT_SIZE

BACKBONE_NAME = "mobilenetv2"


def build_model(alpha: float = 0.5, weights: str | None = None, seed: int = 0) -> Any:
    """Build the (uncompiled) classifier.

    The input is the contract's (224, 224, 3) float in [0, 255]; the first layer rescales to
    [-1, 1] as MobileNetV2 was trained, so the scaling travels inside the saved graph.
    ``weights`` is a path to the Keras Applications "no_top" ImageNet file (nothing is downloaded).
    """
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(INPUT_SIZE, INPUT_SIZE, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="to_unit_range")(inputs)
    backbone = keras.applications.MobileNetV2(
        input_shape=(INPUT_SIZE, INPUT_SIZE, 3),
        alpha=alpha,
        include_top=False,
        weights=weights,
        name=BACKBONE_NAME,  # stable name for freezing and Grad-CAM
    )
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(100, activation="relu", name="fc100")(x)
    x = keras.layers.Dropout(0.6, name="dropout")(x)
    x = keras.layers.Dense(50, activation="relu", name="fc50")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="pneumonia")(x)
    return keras.Model(inputs, outputs, name="cxr_pneumonia_mobilenetv2")
