"""Channel curves drive ARKit weights as documented."""

from __future__ import annotations

import numpy as np
import pytest

from mmtalker.data.arkit_drive import DRIVE, arkit_weights
from mmtalker.data.motion import CHANNELS
from mmtalker.errors import DatasetError
from mmtalker.rig import ARKIT_NAMES


def _curves(**values: float) -> np.ndarray:
    row = np.zeros(len(CHANNELS), np.float32)
    for name, value in values.items():
        row[CHANNELS.index(name)] = value
    return row[None]


def _weights(**values: float) -> dict[str, float]:
    return dict(zip(ARKIT_NAMES, arkit_weights(_curves(**values), ARKIT_NAMES)[0], strict=True))


def test_each_channel_drives_its_shapes_and_nothing_else() -> None:
    for channel, shapes in DRIVE.items():
        weights = _weights(**{channel: 1.0})
        moved = {name for name, value in weights.items() if value > 0}
        assert moved == set(shapes), channel
        for shape, gain in shapes.items():
            assert weights[shape] == pytest.approx(min(gain, 1.0)), (channel, shape)


def test_mouth_close_seals_the_lips_over_the_open_jaw_only() -> None:
    assert _weights(lip_closure=1.0)["mouthClose"] == 0.0  # no jaw opening to close over
    sealed = _weights(lip_closure=1.0, jaw_open=0.5)
    assert sealed["mouthClose"] == pytest.approx(sealed["jawOpen"])
    assert _weights(lip_closure=0.1, jaw_open=1.0)["mouthClose"] == pytest.approx(0.1)


def test_weights_stay_in_the_unit_range() -> None:
    weights = arkit_weights(np.full((4, len(CHANNELS)), 3.0), ARKIT_NAMES)
    assert weights.min() >= 0 and weights.max() <= 1
    assert arkit_weights(np.full((2, len(CHANNELS)), -1.0), ARKIT_NAMES).max() == 0


def test_a_rig_without_the_driven_shapes_is_refused() -> None:
    with pytest.raises(DatasetError, match="jawOpen"):
        arkit_weights(_curves(jaw_open=1.0), [n for n in ARKIT_NAMES if n != "jawOpen"])
