"""The learnable surface sampler: its distribution, importance weights and variance gradient."""

from __future__ import annotations

import itertools
from functools import cache

import numpy as np
import pytest
import torch

from mmtalker.data.face import FaceTemplate, make_template
from mmtalker.errors import TemplateError
from mmtalker.geometry.sampling import SurfaceSampler
from mmtalker.geometry.uv import face_areas


@cache
def template() -> FaceTemplate:
    return make_template(1000)


def face_sampler() -> SurfaceSampler:
    tpl = template()
    return SurfaceSampler(tpl.topology.faces, face_areas(tpl.vertices, tpl.topology.faces))


def strip_sampler() -> SurfaceSampler:
    """Six triangles of a jittered 2×4 vertex strip, of unequal areas, in float64."""
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.arange(4.0), np.arange(2.0))
    vertices = np.stack([x.ravel(), y.ravel(), np.zeros(8)], axis=1)
    vertices[:, :2] += rng.uniform(-0.3, 0.3, (8, 2))
    faces = np.array([[0, 1, 4], [1, 5, 4], [1, 2, 5], [2, 6, 5], [2, 3, 6], [3, 7, 6]])
    sampler = SurfaceSampler(faces, face_areas(vertices, faces)).double()
    with torch.no_grad():
        sampler.logits.copy_(torch.tensor([0.4, -0.3, 0.8, 0.0, -0.6, 0.2]))
    return sampler


def randomise(sampler: SurfaceSampler, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sampler.logits.copy_(torch.randn(sampler.logits.shape, generator=generator))


def test_starts_area_uniform() -> None:
    sampler = face_sampler()
    p = sampler.probabilities().detach()
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(p, sampler.areas / sampler.areas.sum(), rtol=1e-5)
    assert float(sampler.coverage_loss().detach()) == pytest.approx(0.0, abs=1e-6)


def test_samples_lie_on_triangles_with_weights_q_over_p() -> None:
    sampler = face_sampler()
    randomise(sampler, 0)
    sample = sampler.sample(10_000, torch.Generator().manual_seed(1))
    assert sample.face_index.dtype == torch.long and sample.face_index.shape == (10_000,)
    assert sample.bary.shape == (10_000, 3) and (sample.bary >= 0).all()
    np.testing.assert_allclose(sample.bary.sum(dim=1), 1.0, rtol=1e-6)
    q = sampler.areas / sampler.areas.sum()
    expected = q[sample.face_index] / sampler.probabilities()[sample.face_index]
    np.testing.assert_allclose(sample.weight, expected.detach(), rtol=1e-6)
    assert not sample.weight.requires_grad


def test_points_are_uniform_inside_their_triangle() -> None:
    sample = face_sampler().sample(100_000, torch.Generator().manual_seed(2))
    # Each corner's quarter-area sub-triangle (that corner's coordinate above 1/2) gets 1/4.
    share = (sample.bary > 0.5).double().mean(dim=0)
    np.testing.assert_allclose(share, 0.25, atol=6e-3)


def test_face_frequencies_follow_the_probabilities() -> None:
    sampler = face_sampler()
    randomise(sampler, 3)
    num = 400_000
    sample = sampler.sample(num, torch.Generator().manual_seed(4))
    counts = torch.bincount(sample.face_index, minlength=len(sampler.faces)).double()
    expected = sampler.probabilities().detach().double() * num
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = len(sampler.faces) - 1
    assert abs(chi2 - dof) < 5 * np.sqrt(2 * dof), (chi2, dof)


def test_weighted_estimate_is_unbiased_for_any_sampler() -> None:
    sampler = strip_sampler()
    error = torch.tensor([0.1, 2.0, 0.5, 3.0, 1.0, 0.2], dtype=torch.float64)
    sample = sampler.sample(400_000, torch.Generator().manual_seed(5))
    estimate = (sample.weight * error[sample.face_index]).mean()
    exact = (sampler.areas / sampler.areas.sum() * error).sum()
    assert float(estimate) == pytest.approx(float(exact), rel=0.01)


def test_estimator_loss_gradient_is_the_variance_gradient() -> None:
    sampler = strip_sampler()
    error = torch.tensor([0.1, 2.0, 0.5, 3.0, 1.0, 0.2], dtype=torch.float64)
    q = sampler.areas / sampler.areas.sum()
    variance = (q**2 * error**2 / sampler.probabilities()).sum()
    (exact,) = torch.autograd.grad(variance, sampler.logits)

    sample = sampler.sample(400_000, torch.Generator().manual_seed(6))
    point_error = error[sample.face_index].requires_grad_(True)
    sampler.estimator_loss(sample, point_error).backward()
    assert point_error.grad is None, "the estimator loss must only train the logits"
    relative = float((sampler.logits.grad - exact).norm() / exact.norm())
    assert relative < 0.05, (sampler.logits.grad, exact)


def test_estimator_loss_averages_leading_dimensions_of_the_error() -> None:
    sampler = strip_sampler()
    sample = sampler.sample(64, torch.Generator().manual_seed(7))
    error = torch.rand(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    batched = sampler.estimator_loss(sample, error).detach()
    averaged = sampler.estimator_loss(sample, error.mean(dim=0)).detach()
    assert float(batched) == pytest.approx(float(averaged), rel=1e-12)


class _Probe(torch.nn.Module):
    """Exposes the sampler's distribution as a forward pass, so functional_call can vary θ."""

    def __init__(self, sampler: SurfaceSampler) -> None:
        super().__init__()
        self.sampler = sampler

    def forward(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.probabilities(), self.sampler.log_prob(index)


def test_probabilities_and_log_prob_pass_gradcheck() -> None:
    probe = _Probe(strip_sampler())
    index = torch.tensor([0, 2, 2, 5])
    logits = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda theta: torch.func.functional_call(probe, {"sampler.logits": theta}, (index,)),
        (logits,),
    )


def test_coverage_loss_grows_as_p_leaves_area_uniform() -> None:
    sampler = strip_sampler()
    direction = torch.tensor([1.0, -1.0, 0.5, 0.0, -0.5, 0.2], dtype=torch.float64)
    losses = []
    for scale in (0.0, 0.5, 1.0, 2.0, 4.0):
        with torch.no_grad():
            sampler.logits.copy_(scale * direction)
        losses.append(float(sampler.coverage_loss().detach()))
    assert losses[0] == pytest.approx(0.0, abs=1e-12)
    assert all(a < b for a, b in itertools.pairwise(losses)), losses


def test_density_ratio_is_one_for_any_region_at_start() -> None:
    sampler = face_sampler()
    for name in ("lips", "eyes", "upper_face", "face"):
        ratio = sampler.density_ratio(template().topology.region(name))
        assert ratio == pytest.approx(1.0, rel=1e-5)


def test_sampling_concentrates_where_the_error_is_large() -> None:
    tpl = template()
    sampler = face_sampler()
    lips = tpl.topology.region("lips")
    on_lips = torch.from_numpy(np.isin(tpl.topology.faces, lips).sum(axis=1) >= 2)
    # Motion-like error: large on the lips, small elsewhere (nonzero, so no face is worthless).
    error = torch.where(on_lips, 1.0, 0.1)
    optimiser = torch.optim.Adam(sampler.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(9)
    for _ in range(200):
        sample = sampler.sample(1024, generator)
        loss = sampler.estimator_loss(sample, error[sample.face_index])
        loss = loss + 0.01 * sampler.coverage_loss()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    p = sampler.probabilities().detach()
    q = sampler.areas / sampler.areas.sum()
    assert sampler.density_ratio(lips) > 2.0, sampler.density_ratio(lips)
    assert (p / q).min() > 0.05, "the coverage term must keep every triangle sampled"
    # The point of it all: the surface-loss estimator's variance went down.
    variance = (q**2 * error**2 / p).sum()
    assert float(variance) < 0.6 * float((q * error**2).sum())


def test_triangles_without_area_are_rejected() -> None:
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    with pytest.raises(TemplateError, match="1 triangles have no positive area"):
        SurfaceSampler(faces, np.array([0.5, 0.0]))
