"""The whole ICT head a model animates: per-part error against the rig, and socket show-through.

Usage: python bench/whole_head.py --checkpoint DIR [--data work/datasets/demo] [--split test]
                                  [--sequences 20] [--catalog work/catalogs/demo]

A model trained on an ICT corpus animates the whole head through its display map
(``mmtalker.rig.head``). Two figures say how well the parts it never trained on follow:

- **Error per head part** against the rig's own motion: an ICT corpus stores each frame's ARKit
  weights, so the speaker's identity-adapted head composed with them is the truth for every head
  vertex (sockets and neck included). Mean vertex error in mm per part, the static head's beside
  it.
- **Socket show-through** on a catalog of clips (the training speaker's head): frames where a
  mouth-socket vertex above the mouth opening (higher than 4 mm below the top of the lips) has no
  face triangle in front of it along the view axis (+z), i.e. pokes through the skin, and the most
  such vertices in one frame.

A benchmark: it reports figures and never fails on them.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
from scipy.spatial import cKDTree

from mmtalker.checkpoint import load_checkpoint
from mmtalker.data.shards import open_dataset
from mmtalker.inference import animate_face, face_of, load_audio, resolve_face
from mmtalker.rig import load_ict
from mmtalker.rig.arkit import arkit_to_rig
from mmtalker.rig.head import head_regions
from mmtalker.rig.rig import FACE_PART, Rig
from mmtalker_platform.catalog import list_catalog

# Socket vertices this far below the lips' top or higher are above the mouth opening.
OPENING_MARGIN_M = 0.004
# Face triangles (nearest centroids in the image plane) tested for covering a vertex.
_CANDIDATES = 24


def showing_through(frame: np.ndarray, head: Rig, socket: np.ndarray, lips: np.ndarray) -> int:
    """Mouth-socket vertices of one head frame (V, 3) above the mouth opening that no face
    triangle covers along +z."""
    face = head.parts[FACE_PART].triangles
    corners = frame[head.faces[face.start : face.stop]]
    points = frame[socket]
    _, near = cKDTree(corners[:, :, :2].mean(axis=1)).query(points[:, :2], k=_CANDIDATES)
    a, b, c = (corners[near, k] for k in range(3))
    e1, e2, d = (b - a)[..., :2], (c - a)[..., :2], points[:, None, :2] - a[..., :2]
    det = e1[..., 0] * e2[..., 1] - e2[..., 0] * e1[..., 1]
    det = np.where(det == 0, np.inf, det)
    s = (d[..., 0] * e2[..., 1] - e2[..., 0] * d[..., 1]) / det
    t = (e1[..., 0] * d[..., 1] - d[..., 0] * e1[..., 1]) / det
    inside = (s >= 0) & (t >= 0) & (s + t <= 1)
    depth = a[..., 2] + s * (b - a)[..., 2] + t * (c - a)[..., 2]
    covered = (inside & (depth > points[:, None, 2])).any(axis=1)
    above = points[:, 1] > frame[lips, 1].max() - OPENING_MARGIN_M
    return int((~covered & above & inside.any(axis=1)).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="work/datasets/demo")
    parser.add_argument("--split", default="test")
    parser.add_argument("--sequences", type=int, default=20)
    parser.add_argument("--catalog", default="work/catalogs/demo")
    args = parser.parse_args()

    checkpoint = load_checkpoint(args.checkpoint)
    dataset = open_dataset(args.data)
    head = load_ict()
    regions = head_regions(head)
    parts = {name: p.vertices for name, p in head.parts.items() if not name.startswith("eyeball")}
    errors: dict[str, list[float]] = {name: [] for name in parts}
    still: dict[str, list[float]] = {name: [] for name in parts}
    sequences = list(itertools.islice(dataset.sequences(args.split), args.sequences))
    for seq in sequences:
        identity = dataset.manifest.extra["speakers"][seq.speaker]["identity"]
        person = head.with_identity(np.asarray(identity, np.float32))
        truth = person.compose(arkit_to_rig(seq.controls, person.shape_names))
        face = face_of(checkpoint, person.neutral)
        predicted = animate_face(seq.audio, face, checkpoint, sample_rate=seq.sample_rate)
        error = np.linalg.norm(predicted.vertices[: len(truth)] - truth, axis=-1)
        static = np.linalg.norm(truth - person.neutral[None], axis=-1)
        for name, span in parts.items():
            errors[name].append(float(error[:, span.start : span.stop].mean()))
            still[name].append(float(static[:, span.start : span.stop].mean()))
    print(f"{args.data} {args.split}: {len(sequences)} sequences against the rig's own motion")
    print(f"{'head part':<18} {'model mm':>9} {'static mm':>10}")
    for name in parts:
        print(f"{name:<18} {1e3 * np.mean(errors[name]):9.3f} {1e3 * np.mean(still[name]):10.3f}")

    clips = list_catalog(args.catalog)
    face = resolve_face(checkpoint)
    socket, lips = regions["mouth_socket"], regions["lips"]
    counts = []
    for clip in clips:
        audio, rate = load_audio(clip.audio_uri)
        frames = animate_face(audio, face, checkpoint, sample_rate=rate).vertices
        counts += [showing_through(frame, head, socket, lips) for frame in frames]
    shown = np.asarray(counts)
    print(
        f"socket show-through on {len(clips)} clips of {args.catalog}: {(shown > 0).sum()} of "
        f"{len(shown)} frames, at most {shown.max(initial=0)} vertices in a frame"
    )


if __name__ == "__main__":
    main()
