"""Volume geometry helpers on hand-computable affines."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.types import Volume, same_physical_grid


def test_spacing_origin_orientation() -> None:
    aff = np.array([[-0.5, 0, 0, 10], [0, -0.5, 0, 20], [0, 0, 2.0, -5], [0, 0, 0, 1]])
    vol = Volume(np.zeros((1, 4, 3, 2)), aff)
    assert vol.spacing_mm == (0.5, 0.5, 2.0)
    assert vol.origin_mm == (10.0, 20.0, -5.0)
    assert vol.orientation == "LPS"
    assert vol.spatial_shape == (4, 3, 2) and vol.spatial_dims == 3
    np.testing.assert_allclose(vol.voxel_to_world([[1, 1, 1]]), [[9.5, 19.5, -3.0]])


def test_2d_volume() -> None:
    vol = Volume(np.zeros((1, 5, 4)), np.diag([0.2, 0.3, 1.0, 1.0]))
    assert vol.spatial_dims == 2 and vol.spacing_mm == (0.2, 0.3) and vol.orientation == "RA"


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="4x4"):
        Volume(np.zeros((1, 2, 2, 2)), np.eye(3))
    with pytest.raises(ValueError, match="dimensions"):
        Volume(np.zeros((2, 2)), np.eye(4))


def test_same_physical_grid_ignores_storage_order() -> None:
    shape = (4, 3, 5)
    a = np.diag([1.0, 2.0, 3.0, 1.0])
    # same voxels with the y axis stored in reverse order
    b = a.copy()
    b[1, 1] = -2.0
    b[1, 3] = 2.0 * (shape[1] - 1)
    assert same_physical_grid(shape, a, shape, b)
    shifted = a.copy()
    shifted[0, 3] = 0.01
    assert not same_physical_grid(shape, a, shape, shifted, atol_mm=1e-3)
    assert not same_physical_grid(shape, a, (4, 3, 6), a)


@pytest.mark.parametrize(
    ("column", "problem"),
    [
        ([0.0, 0.0, 0.0], r"zero spacing along voxel axis 1"),
        ([2.0, 0.0, 0.0], r"singular: its voxel axes are parallel"),
        ([np.nan, 1.0, 0.0], r"non-finite values \(NaN or infinity at \[0, 1\]\)"),
    ],
)
def test_volume_refuses_an_affine_that_maps_no_grid(column: list[float], problem: str) -> None:
    """A zero, singular or non-finite affine is a DataError naming the volume's source and the problem."""
    from medseg.errors import DataError

    aff = np.diag([1.0, 1.0, 2.5, 1.0])
    aff[:3, 1] = column
    with pytest.raises(
        DataError, match=rf"^scan\.nrrd: the voxel-to-world affine (has|is) {problem}.*Fix the geometry"
    ):
        Volume(np.zeros((1, 2, 2, 2)), aff, {"source": "scan.nrrd"})
    with pytest.raises(DataError, match=rf"^a\.nii, b\.nii: .*{problem}"):
        Volume(np.zeros((1, 2, 2, 2)), aff, {"source": ["a.nii", "b.nii"]})


def test_2d_volume_checks_only_its_pixel_axes() -> None:
    """A 2D grid uses the first two columns; a degenerate third column is allowed and the orientation
    code still has a letter for each pixel axis."""
    from medseg.errors import DataError
    from medseg.types import affine_problem

    coronal = np.array([[0.5, 0, 0, 0], [0, 0, 0, 0], [0, 0.7, 0, 0], [0, 0, 0, 1.0]])  # third column zero
    vol = Volume(np.zeros((1, 5, 4)), coronal)
    assert vol.orientation == "RS" and vol.spacing_mm == (0.5, 0.7)
    assert affine_problem(coronal, 2) is None and "zero spacing" in affine_problem(coronal, 3)
    with pytest.raises(DataError, match="parallel"):
        Volume(np.zeros((1, 5, 4)), np.array([[1.0, 3, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]]))
