"""Face surface geometry: the UV chart, surface-point correspondence and learnable sampling."""
