"""Intrinsic coordinates of a surface: the low eigenfunctions of its Laplace-Beltrami operator.

A UV chart is planar, so points the surface keeps apart can lie side by side on it: the two lips
of a closed mouth are the two rims of a slit a fraction of a millimetre wide in the chart. The
eigenfunctions are measured along the surface, where the lips meet only at the mouth's corners,
so they tell such points apart; being piecewise linear over the triangles, they can be read at
any surface point by barycentric interpolation, as the chart is.
"""

from __future__ import annotations

import igl
import numpy as np
from scipy.sparse.linalg import eigsh

from mmtalker.errors import TemplateError
from mmtalker.geometry.uv import DEGENERATE_AREA_FRACTION, face_areas


def laplacian_eigenfunctions(vertices: np.ndarray, faces: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` lowest non-constant eigenfunctions (V, count) float32 of the cotangent
    Laplacian, each scaled to a largest magnitude of 1 and signed so that it is positive there.

    Deterministic for a given mesh; columns past the mesh's ``V - 2`` available ones are zero.
    """
    vertices = np.ascontiguousarray(vertices, dtype=np.float64)
    faces = np.ascontiguousarray(faces, dtype=np.int64)
    out = np.zeros((len(vertices), count), dtype=np.float32)
    available = min(count, len(vertices) - 2)
    if available <= 0:
        return out
    # Eigenfunctions do not depend on the mesh's scale; at unit area the shift below is small
    # against every eigenvalue whatever units the mesh is in. Zero-area triangles (scans have
    # them) have no cotangents and carry no area, so they are left out.
    areas = face_areas(vertices, faces)
    faces = faces[areas > DEGENERATE_AREA_FRACTION * np.median(areas)]
    vertices = vertices / np.sqrt(areas.sum())
    used = np.zeros(len(vertices), dtype=bool)
    used[faces.ravel()] = True
    stiffness = -igl.cotmatrix(vertices, faces)
    mass = igl.massmatrix(vertices, faces, igl.MASSMATRIX_TYPE_VORONOI)
    if not (used.all() and np.isfinite(stiffness.data).all() and (mass.diagonal() > 0).all()):
        raise TemplateError(
            "the mesh has vertices on no triangle of positive area, so its Laplacian is "
            "undefined there; remove them before building a model on it"
        )
    # Shift-invert just below zero finds the smallest eigenvalues; a seeded start vector makes
    # ARPACK's answer the same on every run (though not the sign of a mode that a symmetric face
    # makes ambiguous to round-off, which is why models store the result with their weights).
    _, vectors = eigsh(
        stiffness.tocsc(), k=available + 1, M=mass.tocsc(), sigma=-1e-3, which="LM",
        v0=np.random.default_rng(0).standard_normal(len(vertices)),
    )  # fmt: skip
    vectors = vectors[:, 1:]
    peak = np.abs(vectors).argmax(axis=0)
    vectors = vectors / vectors[peak, np.arange(available)]
    out[:, :available] = vectors
    return out
