"""Laplacian eigenfunctions as intrinsic coordinates of a surface."""

from __future__ import annotations

import igl
import numpy as np
import pytest

from mmtalker.errors import TemplateError
from mmtalker.geometry.spectral import laplacian_eigenfunctions


def slit_sheet(nx: int = 41, ny: int = 21) -> tuple[np.ndarray, np.ndarray, int, int]:
    """A flat 2 x 1 sheet cut along y = 0.5 for 0.5 < x < 1.5, like a closed mouth: the cut's
    vertices are doubled, so the two rims lie on top of each other. Returns vertices, faces and
    the lower and upper copy of the cut's middle vertex."""
    xs, ys = np.linspace(0, 2, nx), np.linspace(0, 1, ny)
    grid = np.array([[x, y, 0.0] for y in ys for x in xs])
    row = ny // 2
    cut = [row * nx + i for i in range(nx) if 0.5 < xs[i] < 1.5]
    upper_copy = {v: len(grid) + k for k, v in enumerate(cut)}
    vertices = np.concatenate([grid, grid[cut]])
    faces = []
    for j in range(ny - 1):
        for i in range(nx - 1):
            a, b, c, d = j * nx + i, j * nx + i + 1, (j + 1) * nx + i, (j + 1) * nx + i + 1
            quad = [(a, b, d), (a, d, c)]
            if j == row:  # the cells just above the cut use its upper copy
                quad = [tuple(upper_copy.get(v, v) for v in tri) for tri in quad]
            faces.extend(quad)
    middle = cut[len(cut) // 2]
    return vertices, np.array(faces), middle, upper_copy[middle]


def test_the_two_rims_of_a_slit_differ_though_they_touch() -> None:
    vertices, faces, lower, upper = slit_sheet()
    assert np.allclose(vertices[lower], vertices[upper])
    phi = laplacian_eigenfunctions(vertices, faces, 8)
    across = np.linalg.norm(phi[lower] - phi[upper])
    # A grid step away on the same rim the functions hardly change; across the cut they do.
    along = np.linalg.norm(phi[lower] - phi[lower + 1])
    assert across > 5 * along


def test_eigenfunctions_are_mass_orthogonal_scaled_and_signed() -> None:
    vertices, faces, _, _ = slit_sheet()
    phi = laplacian_eigenfunctions(vertices, faces, 6).astype(np.float64)
    assert phi.shape == (len(vertices), 6) and phi.dtype == np.float64
    mass = igl.massmatrix(vertices, faces, igl.MASSMATRIX_TYPE_VORONOI)
    gram = phi.T @ (mass @ phi)
    assert np.abs(gram - np.diag(np.diag(gram))).max() < 1e-4 * np.diag(gram).max()
    # None is the constant function, each peaks at +1.
    assert np.abs(phi.T @ mass.diagonal()).max() < 1e-6
    assert np.allclose(phi.max(axis=0), 1.0)
    assert (np.abs(phi).max(axis=0) <= 1.0 + 1e-6).all()
    # The first varies along the sheet's long side, as the lowest mode of a 2 x 1 membrane does.
    assert abs(np.corrcoef(phi[:, 0], vertices[:, 0])[0, 1]) > 0.9


def test_deterministic_and_padded_past_the_available_modes() -> None:
    vertices, faces, _, _ = slit_sheet(9, 5)
    first = laplacian_eigenfunctions(vertices, faces, 4)
    np.testing.assert_array_equal(first, laplacian_eigenfunctions(vertices, faces, 4))
    many = laplacian_eigenfunctions(vertices, faces, len(vertices) + 3)
    assert (many[:, len(vertices) - 2 :] == 0).all() and (many[:, : len(vertices) - 2] != 0).any()


def test_unused_vertices_are_refused() -> None:
    vertices, faces, _, _ = slit_sheet(9, 5)
    stray = np.concatenate([vertices, [[5.0, 5.0, 0.0]]])
    with pytest.raises(TemplateError, match="no triangle of positive area"):
        laplacian_eigenfunctions(stray, faces, 4)
