"""How the synthetic corpus drives an ARKit rig: articulation channels to blendshape weights.

The phoneme timings and coarticulation model (:mod:`mmtalker.data.visemes`) give per-frame
channels: jaw opening, lip rounding, spreading, bilabial closure and the labiodental tuck; blinks
and prosody-driven brows come from :mod:`mmtalker.data.motion`. On a rig with Apple's ARKit
blendshapes each channel drives a few shapes, as an animator would key them:

==============  ===========================================================================
channel         ARKit shapes (weight per unit of the channel)
==============  ===========================================================================
jaw_open        jawOpen 0.45, mouthLowerDown 0.25 (both sides)
lip_round       mouthPucker 0.7, mouthFunnel 0.45
lip_spread      mouthStretch 0.3, mouthSmile 0.2 (both sides)
lip_closure     mouthPress 0.5 (both sides), mouthRollLower 0.15, mouthRollUpper 0.1, and
                mouthClose = min(closure, jawOpen): the lips seal over whatever the jaw
                opening is left (mouthClose only means something together with jawOpen)
labiodental     mouthRollLower 0.55, mouthUpperUp 0.2 (both sides), jawOpen 0.05
blink           eyeBlink 1.0 (both sides)
brow_raise      browInnerUp 0.6, browOuterUp 0.45 (both sides)
==============  ===========================================================================

Weights are clipped to [0, 1], the range ARKit and Live Link use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmtalker.data.motion import CHANNELS
from mmtalker.errors import DatasetError

#: Channel -> {ARKit shape: weight per unit of channel activation}.
DRIVE: dict[str, dict[str, float]] = {
    "jaw_open": {"jawOpen": 0.45, "mouthLowerDownLeft": 0.25, "mouthLowerDownRight": 0.25},
    "lip_round": {"mouthPucker": 0.7, "mouthFunnel": 0.45},
    "lip_spread": {
        "mouthStretchLeft": 0.3, "mouthStretchRight": 0.3,
        "mouthSmileLeft": 0.2, "mouthSmileRight": 0.2,
    },
    "lip_closure": {
        "mouthPressLeft": 0.5, "mouthPressRight": 0.5,
        "mouthRollLower": 0.15, "mouthRollUpper": 0.1,
    },
    "labiodental": {
        "mouthRollLower": 0.55, "mouthUpperUpLeft": 0.2, "mouthUpperUpRight": 0.2,
        "jawOpen": 0.05,
    },
    "blink": {"eyeBlinkLeft": 1.0, "eyeBlinkRight": 1.0},
    "brow_raise": {"browInnerUp": 0.6, "browOuterUpLeft": 0.45, "browOuterUpRight": 0.45},
}  # fmt: skip


def drive_matrix(names: Sequence[str]) -> np.ndarray:
    """(len(CHANNELS), len(names)) weights of the linear part of :data:`DRIVE`."""
    index = {name: i for i, name in enumerate(names)}
    missing = sorted({"mouthClose", *(s for shapes in DRIVE.values() for s in shapes)} - set(index))
    if missing:
        raise DatasetError(f"the rig lacks the ARKit shapes {missing}")
    matrix = np.zeros((len(CHANNELS), len(names)), np.float32)
    for row, channel in enumerate(CHANNELS):
        for shape, weight in DRIVE[channel].items():
            matrix[row, index[shape]] += weight
    return matrix


def arkit_weights(curves: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """ARKit weights (T, len(names)) in [0, 1] for channel curves (T, len(CHANNELS))."""
    curves = np.asarray(curves, np.float32)
    if curves.ndim != 2 or curves.shape[1] != len(CHANNELS):
        raise DatasetError(f"curves must be (T, {len(CHANNELS)}), got {curves.shape}")
    weights = np.clip(curves @ drive_matrix(names), 0.0, 1.0)
    jaw, close = list(names).index("jawOpen"), list(names).index("mouthClose")
    closure = np.clip(curves[:, CHANNELS.index("lip_closure")], 0.0, 1.0)
    weights[:, close] = np.minimum(closure, weights[:, jaw])
    return weights
