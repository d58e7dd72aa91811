import math

import numpy as np
import pytest
import torch

from mmtalker.data.sequence import Topology
from mmtalker.losses import LossConfig, combined_loss, motion_losses, phone_loss, vertex_weights


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
    # Dynamics weights scale that term alone: point 3 left out leaves point 1's 2 · 1².
    still = motion_losses(pred, target, mask, weights, lips, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(still.dynamics, torch.tensor(2 * 1.0 / 4), atol=1e-3, rtol=0)
    assert still.position.item() == parts.position.item()
    config = LossConfig(position=1.0, velocity=0.5, lip_max=0.25, dynamics=0.75)
    expected = parts.position + 0.5 * parts.velocity + 0.25 * parts.lip_max + 0.75 * parts.dynamics
    torch.testing.assert_close(combined_loss(parts, config), expected)


def test_motion_losses_gradient_matches_finite_differences() -> None:
    # The loss's backward is written by hand; check it against finite differences on a batch
    # with padding, moving and still points, every term weighted.
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(2, 5, 4, 3, generator=generator, dtype=torch.float64)
    pred = torch.randn(2, 5, 4, 3, generator=generator, dtype=torch.float64)
    pred[:, :, 2] = 0.3  # a point that does not move: its spread's gradient stays finite
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    lips = torch.tensor([True, True, False, False])
    dynamics = torch.tensor([1.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    config = LossConfig(position=1.0, velocity=0.7, lip_max=0.4, dynamics=1.3)

    def loss(values: torch.Tensor) -> torch.Tensor:
        return combined_loss(motion_losses(values, target, mask, weights, lips, dynamics), config)

    assert torch.autograd.gradcheck(loss, (pred.requires_grad_(),))
    # Padded frames get no gradient.
    pred.grad = None
    loss(pred).backward()
    assert pred.grad[1, 3:].abs().max().item() == 0.0


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


def test_vertex_weights_take_the_largest_covering_region_even_below_one() -> None:
    regions = {
        "lips": np.array([0]),
        "eyes": np.array([1, 2]),
        "upper_face": np.array([2, 3]),
        "face": np.arange(5),
    }
    topology = Topology(np.array([[0, 1, 2], [1, 2, 3], [2, 3, 4]]), 5, regions)
    torch.testing.assert_close(
        torch.as_tensor(vertex_weights(topology, {"eyes": 0.0, "upper_face": 0.5})),
        torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0]),
    )
    torch.testing.assert_close(
        torch.as_tensor(vertex_weights(topology, {"lips": 3.0})), torch.tensor([3.0, 1, 1, 1, 1])
    )
