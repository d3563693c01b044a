"""Images given as SimpleITK or nibabel objects (mgr_engine.itk_io.load_image): the voxels and
the grid ITK reads from the same file, and the registration the file's path gives."""

import numpy as np
import pytest

from helpers import oblique_image, smooth_volume
from mgr_engine import itk_io
from mgr_engine.errors import InvalidImageError

itk = pytest.importorskip("itk")
sitk = pytest.importorskip("SimpleITK")
nib = pytest.importorskip("nibabel")

ANGLES = (0.3, -0.2, 0.5)


def oblique_file(tmp_path, array, suffix=".nii.gz", name="image"):
    """``array`` (z, y, x) on an oblique, anisotropic grid, written by ITK."""
    path = tmp_path / f"{name}{suffix}"
    itk.imwrite(oblique_image(array, [1.2, 0.9, 2.1], [-40.0, 13.5, 7.25], ANGLES), str(path))
    return path


def assert_same_image(ours, itks, pixel_type=True):
    grid, expected = itk_io.ImageGrid.of(ours), itk_io.ImageGrid.of(itks)
    assert grid.size == expected.size
    np.testing.assert_allclose(grid.spacing, expected.spacing, rtol=0, atol=1e-5)
    np.testing.assert_allclose(grid.origin, expected.origin, rtol=0, atol=1e-4)
    np.testing.assert_allclose(grid.direction, expected.direction, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(itk.array_view_from_image(ours), itk.array_view_from_image(itks))
    if pixel_type:
        assert type(ours) is type(itks)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_a_simpleitk_image_is_the_image_itk_reads_from_its_file(tmp_path, suffix, dtype):
    path = oblique_file(tmp_path, (smooth_volume((7, 9, 6), seed=1) * 200).astype(dtype), suffix)
    ours = itk_io.load_image(sitk.ReadImage(str(path)))
    assert_same_image(ours, itk.imread(str(path)))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_a_nibabel_image_is_the_image_itk_reads_from_its_file(tmp_path, dtype):
    path = oblique_file(tmp_path, (smooth_volume((7, 9, 6), seed=2) * 200).astype(dtype))
    assert_same_image(itk_io.load_image(nib.load(str(path))), itk.imread(str(path)))


def test_a_nibabel_images_scaling_flips_and_trailing_axis_are_read_as_itk_reads_them(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(-300, 300, (6, 8, 5, 1)).astype(np.int16)  # i, j, k and a time axis of one frame
    affine = np.eye(4)
    affine[:3, :3] = np.linalg.qr(rng.standard_normal((3, 3)))[0] @ np.diag([-1.5, 0.8, 2.0])  # a flipped axis
    affine[:3, 3] = [10.0, -20.0, 5.5]
    image = nib.Nifti1Image(data, affine)
    image.header.set_slope_inter(0.5, -12.0)  # the voxels are 0.5 * stored - 12
    path = tmp_path / "scaled.nii"
    nib.save(image, str(path))
    loaded = nib.load(str(path))
    ours = itk_io.load_image(loaded)
    itks = itk.imread(str(path))
    assert_same_image(ours, itks, pixel_type=False)  # ITK reads scaled voxels as float32, nibabel as float64
    np.testing.assert_array_equal(itk.array_view_from_image(ours), 0.5 * data[..., 0].transpose(2, 1, 0) - 12.0)
    index = np.array([1.5, 2.0, 3.25])  # (i, j, k): ITK's (x, y, z) index
    expected = np.diag([-1, -1, 1]) @ (loaded.affine[:3, :3] @ index + loaded.affine[:3, 3])  # RAS -> LPS
    for image in (ours, itks):
        grid = itk_io.ImageGrid.of(image)
        np.testing.assert_allclose(grid.origin + grid.direction @ (grid.spacing * index), expected, atol=1e-4)


@pytest.mark.parametrize("image, itk_type", [
    pytest.param(lambda data: sitk.GetImageFromArray(data.astype(np.int8)), np.int16, id="simpleitk-int8"),
    pytest.param(lambda data: sitk.GetImageFromArray(data.astype(np.int64)), np.int32, id="simpleitk-int64"),
    pytest.param(lambda data: nib.Nifti1Image(data.transpose(2, 1, 0).astype(np.int64), np.eye(4), dtype=np.int64),
                 np.int32, id="nibabel-int64"),
    pytest.param(lambda data: nib.Nifti1Image(data.transpose(2, 1, 0) * 2**40, np.eye(4), dtype=np.int64),
                 np.float64, id="nibabel-int64-beyond-int32"),
])
def test_types_itk_does_not_wrap_become_the_nearest_it_does(image, itk_type):
    data = np.arange(60).reshape(3, 4, 5) % 7 - 3  # (z, y, x)
    ours = itk.array_view_from_image(itk_io.load_image(image(data)))
    assert ours.dtype == itk_type
    scale = 2**40 if itk_type == np.float64 else 1
    np.testing.assert_array_equal(ours, data * scale)


@pytest.mark.parametrize("image, message", [
    pytest.param(lambda: sitk.Image(8, 9, sitk.sitkFloat32), "2-D", id="simpleitk-2d"),
    pytest.param(lambda: sitk.Image([6, 7, 8], sitk.sitkVectorFloat32, 3), "3 components", id="simpleitk-vector"),
    pytest.param(lambda: nib.Nifti1Image(np.ones((4, 5, 6, 2), np.float32), np.eye(4)), r"shape \(4, 5, 6, 2\)",
                 id="nibabel-4d"),
    pytest.param(lambda: nib.Nifti1Image(np.ones((4, 5, 6), np.float32),
                                         np.array([[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])),
                 "shears", id="nibabel-sheared"),
    pytest.param(lambda: nib.Nifti1Image(np.ones((4, 5, 6), np.complex64), np.eye(4)), "complex64",
                 id="nibabel-complex"),
    pytest.param(lambda: nib.AnalyzeImage(np.ones((4, 5, 6), np.float32), np.diag([1.0, 0.0, 1.0, 1.0])),
                 "no voxel size", id="nibabel-flat-axis"),
])
def test_images_mgr_engine_cannot_register_are_typed_errors(image, message):
    with pytest.raises(InvalidImageError, match=message):
        itk_io.load_image(image(), "fixed")


def test_a_registration_of_simpleitk_and_nibabel_images_is_that_of_their_files(tmp_path):
    import mgr_engine

    fixed = oblique_file(tmp_path, (smooth_volume((30, 34, 28), seed=4) * 1000).astype(np.int16), name="fixed")
    moving = oblique_file(tmp_path, (smooth_volume((30, 34, 28), seed=5) * 1000).astype(np.int16), name="moving")
    labels = oblique_file(tmp_path, (smooth_volume((30, 34, 28), seed=5) > 0.4).astype(np.uint8), name="labels")
    engine = mgr_engine.Engine(model="compact", device="cpu")
    by_path = engine.register(fixed, moving, io_iterations=None)
    by_objects = engine.register(sitk.ReadImage(str(fixed)), nib.load(str(moving)), io_iterations=None)
    assert by_path.phi_ab.abs().max() > 0 and by_path.phi_ab.std() > 0
    np.testing.assert_array_equal(by_objects.phi_ab.numpy(), by_path.phi_ab.numpy())
    point = [-30.0, 20.0, 15.0]
    np.testing.assert_allclose(by_objects.transform.TransformPoint(point), by_path.transform.TransformPoint(point),
                               rtol=0, atol=1e-4)
    warped = by_objects.warp(sitk.ReadImage(str(labels)), interpolation="nearest")
    assert_same_image(warped, by_path.warp(str(labels), interpolation="nearest"))
