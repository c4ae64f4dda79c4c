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


RAS_STORED = (-1, 0, 0, 0, -1, 0, 0, 0, 1)  # a NIfTI written from RAS arrays: i -> right, j -> anterior


def stored_ras_wise(volume):
    """The same patient stored RAS-wise: both in-plane array axes reversed, directions negated, origin
    moved to the other corner, so every voxel keeps its physical position."""
    from MedicalSAM3Core.common.volume import Geometry, Volume

    z, y, x = volume.shape
    g = volume.geometry
    corner = np.array(g.origin) + np.array([(x - 1) * g.spacing[0], (y - 1) * g.spacing[1], 0.0])
    twin_geometry = Geometry(spacing=g.spacing, origin=tuple(corner), direction=RAS_STORED)
    return Volume(np.ascontiguousarray(volume.array[:, ::-1, ::-1]), twin_geometry, modality="CT")


#: IJK-to-RAS matrices (Slicer's convention, 4 x 4) of voxel grids the scene tests run on: RAS- and
#: LPS-ordered axes and an oblique one (a rotation, anisotropic spacing, an origin off zero).
OBLIQUE = np.linalg.qr(np.array([[0.9, 0.3, 0.1], [-0.2, 0.8, 0.4], [0.1, -0.3, 0.9]]))[0]
GRIDS = {
    "RAS": np.diag([0.8, 0.9, 2.5, 1.0]),
    "LPS": np.diag([-0.8, -0.9, 2.5, 1.0]),
    "oblique": np.block([[OBLIQUE @ np.diag([0.8, 0.9, 2.5]), np.array([[10.0], [-20.0], [30.0]])],
                         [np.zeros((1, 3)), np.ones((1, 1))]]),
}
