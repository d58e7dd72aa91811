import math

import pytest
import torch

from mmtalker.losses import LossConfig, combined_loss, motion_losses, phone_loss


def test_motion_losses_by_hand() -> None:
    pred = torch.zeros(1, 3, 4, 3)
    target = torch.zeros(1, 3, 4, 3)
    target[0, 0, 1, 0] = 2.0  # frame 0: lip point 1 off by 2 → squared error 4
    target[0, 1, 3, 0] = 3.0  # frame 1: non-lip point 3 off by 3 → squared error 9
    target[0, 2, 0, 0] = 5.0  # frame 2 is padding: ignored everywhere
    mask = torch.tensor([[True, True, False]])
    lips = torch.tensor([True, True, False, False])
    weights = torch.tensor([1.0, 2.0, 1.0, 1.0])
    parts = motion_losses(pred, target, mask, weights, lips)
    # Position: (2·4 + 9) over 2 frames × 4 points.
    assert parts.position.item() == (2 * 4 + 9) / 8
    # Velocity over the one real frame pair (0→1): point 1 changes by 2, point 3 by 3.
    assert parts.velocity.item() == (2 * 4 + 9) / 4
    # Largest lip error per real frame: 4 in frame 0, 0 in frame 1.
    assert parts.lip_max.item() == 2.0
    torch.testing.assert_close(parts.point_position, torch.tensor([0.0, 2.0, 0.0, 4.5]))
    # Dynamics: the still prediction misses the target's temporal std over real frames, 1 on
    # point 1 (values 2, 0; weight 2) and 1.5 on point 3 (0, 3): (2·1² + 1.5²) over 4 points.
    torch.testing.assert_close(
        parts.dynamics, torch.tensor((2 * 1.0 + 1.5**2) / 4), atol=1e-3, rtol=0
    )
    config = LossConfig(position=1.0, velocity=0.5, lip_max=0.25, dynamics=0.75)
    expected = parts.position + 0.5 * parts.velocity + 0.25 * parts.lip_max + 0.75 * parts.dynamics
    torch.testing.assert_close(combined_loss(parts, config), expected)


def test_lip_max_is_zero_without_lip_points() -> None:
    pred, target = torch.zeros(1, 2, 3, 3), torch.ones(1, 2, 3, 3)
    mask = torch.ones(1, 2, dtype=torch.bool)
    parts = motion_losses(pred, target, mask, torch.ones(3), torch.zeros(3, dtype=torch.bool))
    assert parts.lip_max.item() == 0.0 and parts.position.item() == 3.0


def test_phone_loss_by_hand() -> None:
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)  # frame 0: class 2 gets 3 of 6 parts of the probability
    phones = torch.tensor([[2, 0, -1]])  # frame 1: uniform over 4 classes; frame 2 unlabelled
    expected = (-math.log(0.5) - math.log(0.25)) / 2
    assert phone_loss(logits, phones).item() == pytest.approx(expected)
    assert phone_loss(logits, None).item() == 0.0
    assert phone_loss(logits, torch.full((1, 3), -1)).item() == 0.0
