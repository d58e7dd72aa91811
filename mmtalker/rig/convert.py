"""Rebuild the committed ICT head (``assets/ict_face.npz``) from the ICT Face Model Light npz.

``python -m mmtalker.rig.convert SOURCE.npz OUT_DIR`` keeps the parts in :data:`KEPT_PARTS`,
splits every quad along its shorter diagonal, drops the vertices of the other parts (renumbering
the rest in source order) and stores expression shapes and identity modes as float16. The output
is deterministic: the same source gives the same arrays. See ``assets/README.md``.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np

from mmtalker.errors import RigError

#: The source's parts kept, in output order: the face area, the rest of the head (so previews show
#: a head), the mouth and eye sockets (an open mouth or eye shows a cavity, not a hole) and the
#: eyeballs (1.5 MB: no expression moves them, so their float16 shapes are zeros and compress away).
KEPT_PARTS = (
    "face",
    "head_and_neck",
    "mouth_socket",
    "eye_socket_left",
    "eye_socket_right",
    "eyeball_left",
    "eyeball_right",
)
ASSET_NAME = "ict_face.npz"
_SOURCE_KEYS = (
    "neutral",
    "polygon_sizes",
    "polygon_vertices",
    "expression_names",
    "expressions",
    "identities",
    "geometry_names",
    "geometry_vertex_ranges",
    "geometry_polygon_ranges",
    "landmarks_multipie68",
)


def convert(source: str | Path, out_dir: str | Path) -> Path:
    """Write ``OUT_DIR/ict_face.npz`` converted from the ICT Face Model Light ``source``."""
    arrays = _read_source(Path(source))
    names = [str(n) for n in arrays["geometry_names"]]
    missing = [p for p in KEPT_PARTS if p not in names]
    if missing:
        raise RigError(f"{source} lacks the parts {missing}; is it the ICT Face Model Light npz?")
    starts = np.concatenate([[0], np.cumsum(arrays["polygon_sizes"])])
    neutral = arrays["neutral"].astype(np.float32)
    old_vertices, triangles, vertex_ranges, triangle_ranges = [], [], [], []
    offset = 0
    for part in KEPT_PARTS:
        i = names.index(part)
        v0, v1 = (int(x) for x in arrays["geometry_vertex_ranges"][i])
        p0, p1 = (int(x) for x in arrays["geometry_polygon_ranges"][i])
        part_triangles = _triangulate(
            arrays["polygon_sizes"][p0:p1], arrays["polygon_vertices"], starts[p0:p1], neutral
        )
        old_vertices.append(np.arange(v0, v1))
        triangles.append(part_triangles)
        vertex_ranges.append((offset, offset + v1 - v0))
        offset += v1 - v0
        done = sum(len(t) for t in triangles)
        triangle_ranges.append((done - len(part_triangles), done))
    keep = np.concatenate(old_vertices)
    renumber = np.full(len(neutral), -1, dtype=np.int64)
    renumber[keep] = np.arange(len(keep))
    faces = renumber[np.concatenate(triangles)]
    landmarks = renumber[arrays["landmarks_multipie68"]]
    if (faces < 0).any() or (landmarks < 0).any():
        raise RigError(f"{source}: kept triangles or landmarks use vertices of dropped parts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / ASSET_NAME
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        neutral=neutral[keep],
        faces=faces.astype(np.int32),
        part_names=np.array(KEPT_PARTS),
        part_vertices=np.array(vertex_ranges, dtype=np.int32),
        part_triangles=np.array(triangle_ranges, dtype=np.int32),
        shape_names=arrays["expression_names"].astype(str),
        shapes=arrays["expressions"][:, keep].astype(np.float16),
        identity_modes=arrays["identities"][:, keep].astype(np.float16),
        landmarks_multipie68=landmarks.astype(np.int32),
    )
    target.write_bytes(buffer.getvalue())
    return target


def _read_source(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in _SOURCE_KEYS}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise RigError(f"{path} is not the ICT Face Model Light npz: {exc}") from exc


def _triangulate(
    sizes: np.ndarray, corners: np.ndarray, starts: np.ndarray, positions: np.ndarray
) -> np.ndarray:
    """Triangles of the polygons (3 or 4 corners); quads split along their shorter diagonal."""
    if not np.isin(sizes, (3, 4)).all():
        raise RigError(f"only triangles and quads can be converted, got sizes {np.unique(sizes)}")
    tris = corners[starts[sizes == 3, None] + np.arange(3)]
    quads = corners[starts[sizes == 4, None] + np.arange(4)]
    a, b, c, d = quads.T
    # The shorter diagonal gives the better-shaped pair of triangles.
    along_ac = np.linalg.norm(positions[a] - positions[c], axis=1) <= np.linalg.norm(
        positions[b] - positions[d], axis=1
    )
    first = np.where(along_ac[:, None], np.stack([a, b, c], 1), np.stack([a, b, d], 1))
    second = np.where(along_ac[:, None], np.stack([a, c, d], 1), np.stack([b, c, d], 1))
    # Keep each polygon's triangles next to each other, polygons in source order.
    split = np.empty((len(sizes), 2, 3), dtype=np.int64)
    split[sizes == 3, 0] = tris
    split[sizes == 4, 0] = first
    split[sizes == 4, 1] = second
    rows = np.stack([np.ones(len(sizes), bool), sizes == 4], axis=1)
    return split[rows]


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m mmtalker.rig.convert SOURCE.npz OUT_DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="ict_face_light.npz of the ICT Face Model Light")
    parser.add_argument("out_dir", type=Path, help=f"folder to write {ASSET_NAME} into")
    args = parser.parse_args(argv)
    print(convert(args.source, args.out_dir))


if __name__ == "__main__":
    main()
