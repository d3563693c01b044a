"""Images given as SimpleITK or nibabel objects, and FreeSurfer's MGH files, which ITK does not
read (mgr_engine.itk_io.load_image): the voxels and the grid ITK reads from the same image as a
file, and the registration the file's path gives."""

import sys

import numpy as np
import pytest

from helpers import oblique_image, smooth_volume
from mgr_engine import itk_io
from mgr_engine.errors import ImageReadError, InvalidImageError, MissingDependencyError, OutputWriteError

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


def test_a_nibabel_image_is_placed_by_its_affine_where_itk_would_take_the_files_other_matrix(tmp_path):
    sform, qform = np.eye(4), np.eye(4)
    sform[:3, 3], qform[:3, 3] = [1.0, 2.0, 3.0], [10.0, 20.0, 30.0]
    image = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), None)
    image.set_sform(sform, code="aligned")
    image.set_qform(qform, code="scanner")
    path = tmp_path / "two_matrices.nii"
    nib.save(image, str(path))
    np.testing.assert_array_equal(itk_io.ImageGrid.of(itk.imread(str(path))).origin, [-10.0, -20.0, 30.0])  # qform
    np.testing.assert_array_equal(itk_io.load_image(nib.load(str(path))).GetOrigin(), [-1.0, -2.0, 3.0])  # affine


@pytest.mark.parametrize("image, itk_type", [
    pytest.param(lambda data: sitk.GetImageFromArray(data.astype(np.int8)), np.int16, id="simpleitk-int8"),
    pytest.param(lambda data: sitk.GetImageFromArray(data.astype(np.int64)), np.int32, id="simpleitk-int64"),
    pytest.param(lambda data: nib.Nifti1Image(data.transpose(2, 1, 0).astype(np.int64), np.eye(4), dtype=np.int64),
                 np.int32, id="nibabel-int64"),
    pytest.param(lambda data: nib.Nifti1Image(data.transpose(2, 1, 0) * 2**40, np.eye(4), dtype=np.int64),
                 np.float64, id="nibabel-int64-beyond-int32"),
    pytest.param(lambda data: (data + 3).astype(np.uint64), np.int32, id="array-uint64"),  # ITK holds, cannot write it
    pytest.param(lambda data: nib.Nifti1Image(data.transpose(2, 1, 0) * 2**40, np.eye(4), dtype=np.uint64),
                 np.float64, id="nibabel-uint64-beyond-int32"),
])
def test_types_itk_does_not_wrap_become_the_nearest_it_does(image, itk_type):
    data = np.arange(60).reshape(3, 4, 5) % 7 - 3  # (z, y, x)
    given = image(data)
    ours = itk.array_view_from_image(itk_io.load_image(given))
    assert ours.dtype == itk_type
    expected = given if isinstance(given, np.ndarray) else data * (2**40 if itk_type == np.float64 else 1)
    np.testing.assert_array_equal(ours, expected)


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


def as_mgz(nifti_path):
    """The NIfTI file's image as FreeSurfer's .mgz beside it: its voxels, its affine (vox2ras)."""
    image = nib.load(str(nifti_path))
    path = nifti_path.with_name(nifti_path.name.replace(".nii.gz", ".mgz"))
    nib.save(nib.MGHImage(np.asanyarray(image.dataobj), image.affine), str(path))
    return path


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32])
def test_a_freesurfer_mgz_file_is_the_image_itk_reads_from_the_same_nifti(tmp_path, dtype):
    nifti = oblique_file(tmp_path, (smooth_volume((7, 9, 6), seed=6) * 200).astype(dtype))
    mgz = as_mgz(nifti)
    itks = itk.imread(str(nifti))
    assert_same_image(itk_io.load_image(mgz), itks)
    grid, expected = itk_io.load_image(mgz, grid_only=True), itk_io.ImageGrid.of(itks)
    assert grid.size == expected.size
    np.testing.assert_allclose(np.concatenate([grid.spacing, grid.origin, grid.direction.ravel()]),
                               np.concatenate([expected.spacing, expected.origin, expected.direction.ravel()]),
                               rtol=0, atol=1e-4)


def test_an_mgz_file_that_cannot_be_read_or_written_is_a_typed_error(tmp_path, monkeypatch):
    mgz = as_mgz(oblique_file(tmp_path, smooth_volume((20, 22, 24), seed=7)))
    truncated = tmp_path / "truncated.mgz"
    truncated.write_bytes(mgz.read_bytes()[:mgz.stat().st_size // 2])
    with pytest.raises(ImageReadError, match="cannot read the moving image .*truncated.mgz"):
        itk_io.load_image(truncated, "moving")
    with pytest.raises(OutputWriteError, match="not a displacement field; name the output 'field.nii.gz'"):
        itk_io.check_output_path(tmp_path / "field.mgz", "field")
    itk_io.check_output_path(tmp_path / "warped.mgz", "image")
    field = itk.image_from_array(np.zeros((4, 5, 6, 3), np.float32), is_vector=True)
    too_wide = itk.image_from_array(np.full((4, 5, 6), 2**40, np.uint64))
    for image, message in ((field, "not a vector image"), (too_wide, "type uint64 with these values")):
        with pytest.raises(OutputWriteError, match=message):
            itk_io.write_image(image, tmp_path / "out.mgz")
        assert not list(tmp_path.glob("*out.mgz*"))  # nothing left behind, staged or not
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel raises ImportError
    with pytest.raises(MissingDependencyError, match=r"mgr_engine\[freesurfer\]"):
        itk_io.load_image(mgz, "moving")
    with pytest.raises(MissingDependencyError, match=r"output 'warped.mgz'.*mgr_engine\[freesurfer\]"):
        itk_io.check_output_path(tmp_path / "warped.mgz", "image")


@pytest.mark.parametrize("suffix", [".mgz", ".mgh"])
@pytest.mark.parametrize("dtype, written", [(np.uint8, np.uint8), (np.int16, np.int16), (np.int32, np.int32),
                                            (np.float32, np.float32), (np.uint16, np.int32), (np.float64, np.float32),
                                            (np.uint32, np.int32)])
def test_an_image_written_as_mgz_is_read_back_as_itself(tmp_path, suffix, dtype, written):
    """``write_image`` to FreeSurfer's MGH (through nibabel): read back as the image (the grid
    within the header's float32, the voxels' values; types an MGH file lacks as the nearest it
    holds), placed as nibabel places the NIfTI file ITK writes, gzipped only as ``.mgz``."""
    values = smooth_volume((7, 9, 6), seed=11) * (100 if np.issubdtype(dtype, np.integer) else 1)
    nifti = oblique_file(tmp_path, values.astype(dtype))
    image = itk.imread(str(nifti))
    path = tmp_path / f"written{suffix}"
    itk_io.write_image(image, path)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".mgz")
    back = itk_io.load_image(path)
    assert itk.array_view_from_image(back).dtype == written
    np.testing.assert_array_equal(itk.array_view_from_image(back), itk.array_view_from_image(image).astype(written))
    grid, expected = itk_io.ImageGrid.of(back), itk_io.ImageGrid.of(image)
    assert grid.size == expected.size
    np.testing.assert_allclose(np.concatenate([grid.spacing, grid.origin, grid.direction.ravel()]),
                               np.concatenate([expected.spacing, expected.origin, expected.direction.ravel()]),
                               rtol=0, atol=1e-4)
    np.testing.assert_allclose(nib.load(str(path)).affine, nib.load(str(nifti)).affine, rtol=0, atol=1e-4)


def test_a_registration_of_simpleitk_and_nibabel_images_and_mgz_files_is_that_of_their_files(tmp_path):
    import mgr_engine

    fixed = oblique_file(tmp_path, (smooth_volume((30, 34, 28), seed=4) * 1000).astype(np.int16), name="fixed")
    moving = oblique_file(tmp_path, (smooth_volume((30, 34, 28), seed=5) * 1000).astype(np.int16), name="moving")
    labels = oblique_file(tmp_path, (smooth_volume((30, 34, 28), seed=5) > 0.4).astype(np.uint8), name="labels")
    engine = mgr_engine.Engine(model="compact", device="cpu")
    by_path = engine.register(fixed, moving, io_iterations=None)
    assert by_path.phi_ab.abs().max() > 0 and by_path.phi_ab.std() > 0
    point = [-30.0, 20.0, 15.0]
    for fixed_image, moving_image in [(sitk.ReadImage(str(fixed)), nib.load(str(moving))), (as_mgz(fixed), moving)]:
        result = engine.register(fixed_image, moving_image, io_iterations=None)
        np.testing.assert_array_equal(result.phi_ab.numpy(), by_path.phi_ab.numpy())
        np.testing.assert_allclose(result.transform.TransformPoint(point), by_path.transform.TransformPoint(point),
                                   rtol=0, atol=1e-4)
    warped = result.warp(sitk.ReadImage(str(labels)), interpolation="nearest")
    assert_same_image(warped, by_path.warp(str(labels), interpolation="nearest"))


def test_a_results_outputs_as_simpleitk_images_keep_their_voxels_grid_and_transform(tmp_path):
    import mgr_engine

    fixed = oblique_file(tmp_path, (smooth_volume((26, 30, 24), seed=8) * 1000).astype(np.int16), name="fixed")
    moving = oblique_file(tmp_path, (smooth_volume((26, 30, 24), seed=9) * 1000).astype(np.int16), name="moving")
    result = mgr_engine.Engine(model="compact", device="cpu").register(fixed, moving, io_iterations=None)
    for image in (result.warp(), result.jacobian_determinant()):
        converted = mgr_engine.to_simpleitk(image)
        assert isinstance(converted, sitk.Image)
        assert_same_image(itk_io.load_image(converted), image)
    field = mgr_engine.to_simpleitk(result.displacement_field())
    assert field.GetNumberOfComponentsPerPixel() == 3
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    grid = itk_io.ImageGrid.of(result.fixed)
    rng = np.random.default_rng(0)
    moved = 0.0
    for index in rng.integers(0, grid.size, (20, 3)):  # voxel centres, where the field holds the transform
        point = (grid.origin + grid.direction @ (grid.spacing * index)).tolist()
        expected = np.asarray(result.transform.TransformPoint(point))
        np.testing.assert_allclose(transform.TransformPoint(point), expected, rtol=0, atol=1e-3)
        moved = max(moved, np.abs(expected - point).max())
    assert moved > 0.5  # mm: the transform is not the identity


def test_a_results_outputs_as_nibabel_images_are_what_nibabel_loads_from_itks_files(tmp_path):
    """``to_nibabel`` gives what ``nibabel.load`` reads from the NIfTI file ITK writes of the same
    image (voxels, type, affine, sform and qform, intent), and a file nibabel saves of it reads in
    ITK as the image itself: a warped image, a Jacobian determinant and a displacement field."""
    import mgr_engine

    fixed = oblique_file(tmp_path, (smooth_volume((26, 30, 24), seed=8) * 1000).astype(np.int16), name="fixed")
    moving = oblique_file(tmp_path, (smooth_volume((26, 30, 24), seed=9) * 1000).astype(np.int16), name="moving")
    result = mgr_engine.Engine(model="compact", device="cpu").register(fixed, moving, io_iterations=None)
    field = result.displacement_field()
    assert np.abs(itk.array_view_from_image(field)).max() > 0.5  # mm: not the identity
    for name, image in (("warped", result.warp()), ("jacobian", result.jacobian_determinant()), ("field", field)):
        converted = mgr_engine.to_nibabel(image)
        assert isinstance(converted, nib.Nifti1Image)
        itk.imwrite(image, str(tmp_path / f"{name}-itk.nii.gz"))
        expected = nib.load(str(tmp_path / f"{name}-itk.nii.gz"))
        assert converted.shape == expected.shape
        assert converted.get_data_dtype() == expected.get_data_dtype()
        np.testing.assert_array_equal(np.asanyarray(converted.dataobj), np.asanyarray(expected.dataobj))
        np.testing.assert_allclose(converted.affine, expected.affine, rtol=0, atol=1e-4)
        for key in ("qform_code", "sform_code", "intent_code", "xyzt_units"):
            assert converted.header[key] == expected.header[key], key
        nib.save(converted, str(tmp_path / f"{name}-nibabel.nii.gz"))
        assert_same_image(itk.imread(str(tmp_path / f"{name}-nibabel.nii.gz")), image)
    # a scalar one goes back into mgr_engine as the image itself
    assert_same_image(itk_io.load_image(mgr_engine.to_nibabel(result.warp()), "moving"), result.warp())


def test_to_nibabel_without_nibabel_is_a_typed_error(monkeypatch):
    import mgr_engine

    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(MissingDependencyError, match="pip install nibabel"):
        mgr_engine.to_nibabel(itk.image_from_array(np.zeros((4, 5, 6), np.float32)))


def test_a_torch_tensor_is_read_as_the_numpy_array_of_its_values():
    """A tensor (float, bfloat16, bool, with autograd) is the image of its values' numpy array:
    axes (z, y, x), 1 mm spacing; a (1, 1, D, H, W) batch is told to pass its volume."""
    torch = pytest.importorskip("torch")

    values = smooth_volume((6, 7, 5), seed=3) * 100
    for tensor, as_array in ((torch.from_numpy(values).requires_grad_(True), values),
                             (torch.from_numpy(values).to(torch.bfloat16),
                              torch.from_numpy(values).to(torch.bfloat16).float().numpy()),
                             (torch.from_numpy(values > 50), values > 50)):
        assert_same_image(itk_io.load_image(tensor, "fixed"), itk_io.load_image(as_array))
    for batch in (torch.from_numpy(values)[None, None], values[None]):
        with pytest.raises(InvalidImageError, match=r"fixed array has shape \((1, )+6, 7, 5\); pass its volume, "
                                                    r"array\[0(, 0)?\] \(z, y, x\)"):
            itk_io.load_image(batch, "fixed")


def test_an_array_of_complex_or_non_numbers_is_refused():
    """numpy cast a complex array to float32 keeping its real part (with a ComplexWarning), and
    an array of strings failed inside ITK's conversion."""
    values = smooth_volume((6, 7, 5), seed=3)
    for array, message in ((values.astype(np.complex64), r"fixed array holds complex numbers; pass its magnitude, "
                                                         r"np\.abs\(array\)"),
                           (values.astype(str), r"fixed array holds <U\d+ values, not numbers"),
                           (values.astype(object), r"fixed array holds object values, not numbers")):
        with pytest.raises(InvalidImageError, match=message):
            itk_io.load_image(array, "fixed")
