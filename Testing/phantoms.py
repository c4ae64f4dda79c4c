"""Synthetic test volumes (importable from any test: Testing/ is on sys.path via the root conftest)."""

import numpy as np


def make_phantom(shape=(10, 40, 48), seed=0) -> np.ndarray:
    """A CT-like ``(z, y, x)`` int16 phantom in HU: air, a body ellipse, and two organs."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    array = np.full(shape, -1000.0)
    array[(y / 0.8) ** 2 + (x / 0.9) ** 2 < 1] = 20.0
    array[((y + 0.2) / 0.35) ** 2 + ((x + 0.35) / 0.3) ** 2 + (z / 0.9) ** 2 < 1] = 60.0
    array[((y - 0.2) / 0.2) ** 2 + ((x - 0.4) / 0.2) ** 2 < 1] = 200.0
    return (array + rng.normal(0, 10, shape)).astype(np.int16)
