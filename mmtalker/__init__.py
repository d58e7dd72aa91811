"""MMTalker: speech-driven 3D facial animation by multiresolution representation and fusion."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `mmtalker.animate` without making `import mmtalker` load torch.
    if name == "animate":
        from mmtalker.inference import animate

        return animate
    raise AttributeError(f"module 'mmtalker' has no attribute {name!r}")
