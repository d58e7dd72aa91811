"""MMTalker: speech-driven 3D facial animation by multiresolution representation and fusion."""

__version__ = "0.1.0"
