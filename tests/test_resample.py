"""The result's full-resolution resampling (mgr_engine.resample): the C++ kernel against the
PyTorch path, and both against ITK's filters through the result's transform."""

import numpy as np
import pytest
import torch

from helpers import (affine_transform, composite, oblique_field_transform, oblique_image, oblique_registration,
                     random_affine, random_map, read_back, require_cpp_extension, rotation, smooth_volume,
                     with_and_without_corner_pairs)
from mgr_engine import ops, resample
from mgr_engine.engine import RegistrationResult
from mgr_engine.kernels import resample_cpu

NETWORK = (16, 19, 14)  # (D, H, W), odd and non-cubic


def random_displacement(shape, scale, seed):
    """:func:`random_map`'s displacement in grid voxels, (D, H, W, 3), as a transform holds it."""
    return torch.from_numpy(resample.map_displacement(random_map(shape, scale, seed).numpy()))


def cpp_and_torch(call):
    require_cpp_extension(resample_cpu)
    with ops.kernel_mode("cpp"):
        cpp = call()
    with ops.kernel_mode("torch"):
        torch_path = call()
    return cpp, torch_path


@pytest.fixture(params=["cpp", "torch"])
def kernel(request):
    """Each path of the result's outputs: the C++ kernel and the PyTorch path (``ops.kernel_mode``)."""
    if request.param == "cpp":
        require_cpp_extension(resample_cpu)
    return request.param


@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
@pytest.mark.parametrize("dtype", [getattr(torch, name) for name in resample_cpu.PIXEL_TYPES if hasattr(torch, name)])
def test_cpp_resampling_matches_the_pytorch_path(interpolation, dtype):
    displacement = random_displacement(NETWORK, 0.15, seed=1)
    smooth = torch.from_numpy(smooth_volume((13, 17, 11), 3))
    if dtype == torch.uint8:
        volume = (smooth * 200 + 20).to(dtype)
    else:  # negative values where the type has them
        volume = (smooth * 900 - (300 if dtype.is_signed else -100)).to(dtype)
    # affines that send part of the fixed grid out of the displacement's grid and out of the image
    fixed_to_grid, grid_to_index = random_affine(2), random_affine(3)
    fixed_shape = (12, 21, 18)
    cpp, torch_path = cpp_and_torch(lambda: resample.resampled_image(
        displacement, fixed_to_grid, fixed_shape, volume, grid_to_index, interpolation))
    assert cpp.shape == fixed_shape and cpp.dtype == dtype == torch_path.dtype  # the image's pixel type
    assert 0.2 < (torch_path == 0).double().mean() < 0.8, "the test wants points inside and outside the image"
    if dtype.is_floating_point or interpolation == "nearest":
        torch.testing.assert_close(cpp, torch_path, rtol=1e-9 if dtype == torch.float64 else 1e-6, atol=1e-9)
    else:  # truncated: where the exact value is a whole number, either side's last bit decides
        difference = (cpp.double() - torch_path.double()).abs()
        assert difference.max() <= 1 and (difference > 0).double().mean() < 0.01


def test_the_resampled_image_is_written_into_out_on_either_path(kernel):
    """The engine passes the view of the ITK image the warped image goes into."""
    displacement = random_displacement(NETWORK, 0.15, seed=1)
    volume = (torch.from_numpy(smooth_volume((13, 17, 11), 3)) * 900 - 300).to(torch.int16)
    with ops.kernel_mode(kernel):
        expected = resample.resampled_image(displacement, random_affine(2), (12, 21, 18), volume, random_affine(3))
        out = torch.full((12, 21, 18), 7, dtype=torch.int16)
        assert resample.resampled_image(displacement, random_affine(2), (12, 21, 18), volume, random_affine(3),
                                        out=out) is out
    assert torch.equal(out, expected)


def test_cpp_displacement_field_matches_the_pytorch_path():
    displacement = random_displacement(NETWORK, 0.15, seed=4)
    fixed_to_grid, grid_to_physical, fixed_to_physical = random_affine(5), random_affine(6), random_affine(7)
    cpp, torch_path = cpp_and_torch(lambda: resample.displacement_field(
        displacement, fixed_to_grid, (12, 21, 18), grid_to_physical, fixed_to_physical))
    assert cpp.shape == (12, 21, 18, 3) and cpp.dtype == torch.float32
    torch.testing.assert_close(cpp, torch_path, rtol=1e-6, atol=1e-5)


def test_the_displacement_field_is_written_into_out_on_either_path(kernel):
    """The engine passes the view of the ITK image the field goes into."""
    displacement = random_displacement(NETWORK, 0.15, seed=4)
    affines = random_affine(5), random_affine(6), random_affine(7)
    with ops.kernel_mode(kernel):
        expected = resample.displacement_field(displacement, affines[0], (12, 21, 18), *affines[1:])
        out = torch.full((12, 21, 18, 3), float("nan"))
        assert resample.displacement_field(displacement, affines[0], (12, 21, 18), *affines[1:], out=out) is out
    assert torch.equal(out, expected)


@pytest.mark.parametrize("width", [1, 77])
def test_displacement_corners_loaded_in_pairs_give_the_same_bits(width):
    """Where the CPU runs 512-bit vectors whole, the kernel reads the two corners along x of the
    displacement's stencil with one load (kernels/resample_cpu.cpp, moved_row): the resampled
    images and the displacement field are the same bits as with its gathers (corner_pairs(0)),
    over rows of 77 fixed voxels (blocks of 64 points and a partial vector) and points outside the
    displacement's grid; a grid one voxel wide takes the gathers."""
    from mgr_engine import _resample_cpu

    require_cpp_extension(resample_cpu)
    if not _resample_cpu.corner_pairs(1):
        pytest.skip("the kernel loads pairs only where the CPU runs 512-bit vectors whole")
    displacement = random_displacement((16, 19, 14), 0.15, seed=8)[:, :, :width].contiguous()
    volume = torch.from_numpy(smooth_volume((13, 17, 11), 3) * 900 - 300).to(torch.int16)
    fixed_shape = (9, 10, 77)  # (z, y, x); the affines are (x, y, z): the fixed grid covers the
    # displacement's (16, 19, 14) and a little beyond it, the displacement's grid the image
    fixed_to_grid = np.array([[0.2, 0.02, 0.0, -0.7], [0.01, 2.0, 0.0, -0.5], [0.0, 0.05, 1.8, -0.4]])
    grid_to_index = np.array([[0.8, 0.0, 0.02, -0.3], [0.0, 0.9, 0.0, 0.2], [0.01, 0.0, 0.8, -0.2]])
    grid_to_physical, fixed_to_physical = random_affine(4), random_affine(5)

    def outputs():
        with ops.kernel_mode("cpp"):
            return [resample.resampled_image(displacement, fixed_to_grid, fixed_shape, image, grid_to_index, how)
                    for image in (volume, volume.double()) for how in ("linear", "nearest")] + [
                resample.displacement_field(displacement, fixed_to_grid, fixed_shape, grid_to_physical,
                                            fixed_to_physical)]

    paired, gathered = with_and_without_corner_pairs(_resample_cpu, outputs)
    for a, b in zip(paired, gathered):
        assert torch.equal(a, b) and (a != 0).double().mean() > 0.3
    with ops.kernel_mode("torch"):  # and the field is the PyTorch path's
        field = resample.displacement_field(displacement, fixed_to_grid, fixed_shape, grid_to_physical,
                                            fixed_to_physical)
    torch.testing.assert_close(paired[-1], field, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("image_shape", [(5, 6, 7), (1, 1, 4)])
@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("dtype", [getattr(torch, name) for name in resample_cpu.PIXEL_TYPES if hasattr(torch, name)])
def test_the_image_sampled_in_vectors_gives_the_same_bits(dtype, prefetch, image_shape):
    """Where the CPU runs 512-bit vectors whole, the kernel samples the image 8 points a vector
    (kernels/resample_cpu.cpp, sample_image_vectors): gathered words of pixels, each pixel shifted
    out of its word, the image's last pixels out of its last word. The images, linear and
    nearest, are the same bits as the scalar loops' (corner_pairs(0)) for every pixel type, with
    the corner rows prefetched or not, over rows of 77 points (vectors and a scalar tail) that
    reach past every face of the image, its last voxel along each axis included."""
    from mgr_engine import _resample_cpu

    require_cpp_extension(resample_cpu)
    if not _resample_cpu.corner_pairs(1):
        pytest.skip("the kernel samples in vectors only where the CPU runs 512-bit vectors whole")
    smooth = torch.from_numpy(smooth_volume(image_shape, 3) if min(image_shape) > 1 else
                              np.linspace(0.1, 0.9, int(np.prod(image_shape))).reshape(image_shape))
    if dtype == torch.uint8:
        volume = (smooth * 200 + 20).to(dtype)
    else:
        volume = (smooth * 900 - (300 if dtype.is_signed else -100)).to(dtype)
    displacement = np.zeros((4, 4, 4, 3))  # no displacement: the fixed grid is the image's index grid
    fixed_shape = (21, 25, 77)  # (z, y, x), spaced under half a voxel: some points in [n - 1, n - 0.5)
    low, high = -0.9, np.array(image_shape[::-1]) - 0.2  # (x, y, z)
    steps = (high - low) / (np.array(fixed_shape[::-1]) - 1)
    fixed_to_grid = np.concatenate([np.diag(steps), np.full((3, 1), low)], axis=1)
    fixed_to_grid[0, 1] = 0.01  # rows slightly oblique
    grid_to_index = np.concatenate([np.eye(3), np.zeros((3, 1))], axis=1)
    default = _resample_cpu.prefetch_above_bytes()

    def images():
        with ops.kernel_mode("cpp"):
            return [resample.resampled_image(displacement, fixed_to_grid, fixed_shape, volume.numpy(), grid_to_index,
                                             how) for how in ("linear", "nearest")]

    try:
        _resample_cpu.prefetch_above_bytes(0 if prefetch else 2**62)
        vectors, scalar = with_and_without_corner_pairs(_resample_cpu, images)
    finally:
        _resample_cpu.prefetch_above_bytes(default)
    z, y, x = np.meshgrid(*[np.arange(n) for n in fixed_shape], indexing="ij")
    index = fixed_to_grid @ np.stack([x.ravel(), y.ravel(), z.ravel(), np.ones(x.size)])  # (x, y, z)
    for axis, n in enumerate(image_shape[::-1]):  # the test reaches each axis's last half voxel
        assert ((index[axis] >= n - 1) & (index[axis] < n - 0.5)).any()
    for a, b in zip(vectors, scalar):
        assert np.array_equal(a, b) and 0.2 < (a != 0).mean() < 0.8


@pytest.mark.parametrize("dtype", [torch.int16, torch.float64])
def test_a_nan_displacement_moves_its_points_outside_the_image(dtype):
    """A transform file's field may hold NaN. Its points are outside the image, 0, as ITK has
    them: on the PyTorch path, and on the C++ kernel in vectors and in its scalar loops, which
    read memory 2^31 voxels away there before (a segmentation fault)."""
    from mgr_engine import _resample_cpu

    require_cpp_extension(resample_cpu)
    displacement = random_displacement(NETWORK, 0.15, seed=1)
    displacement[5:9, 6:10, 4:8, 0] = float("nan")  # x only: y and z index the image as usual
    displacement[10, 12, 9] = float("nan")
    volume = (torch.from_numpy(smooth_volume((13, 17, 11), 3)) * 900 + 100).to(dtype)  # no 0 inside
    fixed_to_grid, grid_to_index, fixed_shape = random_affine(2), random_affine(3), (12, 21, 18)
    field = resample.displacement_field(displacement, fixed_to_grid, fixed_shape, np.eye(3, 4), np.eye(3, 4))
    nan = torch.isnan(field).any(-1)
    assert nan.double().mean() > 0.02

    def images():
        with ops.kernel_mode("cpp"):
            return [resample.resampled_image(displacement, fixed_to_grid, fixed_shape, volume, grid_to_index, how)
                    for how in ("linear", "nearest")]

    # the scalar loops on both sides, on a CPU without whole 512-bit vectors
    vectors, scalar = with_and_without_corner_pairs(_resample_cpu, images)
    with ops.kernel_mode("torch"):
        torch_path = [resample.resampled_image(displacement, fixed_to_grid, fixed_shape, volume, grid_to_index, how)
                      for how in ("linear", "nearest")]
    for image in vectors + scalar + torch_path:
        assert (image[nan] == 0).all() and (image[~nan] != 0).double().mean() > 0.3
    for a, b, c in zip(vectors, scalar, torch_path):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=0, atol=1)  # int16 truncation: either side's last bit


def test_a_slab_of_the_displacement_field_is_those_slices_of_the_whole(kernel):
    """The Jacobian determinant goes through the field slab by slab: each slab bit for bit."""
    displacement = random_displacement(NETWORK, 0.15, seed=4)
    affines = random_affine(5), random_affine(6), random_affine(7)
    with ops.kernel_mode(kernel):
        whole = resample.displacement_field(displacement, affines[0], (12, 21, 18), *affines[1:])
        slab = resample.displacement_field(displacement, affines[0], (5, 21, 18), *affines[1:], first_z=4)
    assert torch.equal(slab, whole[4:9])


@pytest.mark.parametrize("arrays", ["tensors", "numpy"])
def test_the_pytorch_path_slab_by_slab_is_the_whole_images(arrays):
    """The PyTorch path (the GPU's) bounds its float64 temporaries by going through slabs of the
    fixed grid: the same bits for slabs of one slice, of 5 of 12 slices and of the whole, with and
    without ``out``."""
    displacement = random_displacement(NETWORK, 0.15, seed=1)
    volume = (torch.from_numpy(smooth_volume((13, 17, 11), 3)) * 900 - 300).to(torch.int16)
    if arrays == "numpy":
        displacement, volume = displacement.numpy(), volume.numpy()
    fixed_to_grid, grid_to_index, grid_to_physical, fixed_to_physical = (random_affine(seed) for seed in (2, 3, 6, 7))
    shape = (12, 21, 18)

    def outputs(slab_voxels, out):
        image = resample.resampled_image(displacement, fixed_to_grid, shape, volume, grid_to_index, "linear",
                                         out=None if out is None else out[0], slab_voxels=slab_voxels)
        nearest = resample.resampled_image(displacement, fixed_to_grid, shape, volume, grid_to_index, "nearest",
                                           slab_voxels=slab_voxels)
        field = resample.displacement_field(displacement, fixed_to_grid, shape, grid_to_physical, fixed_to_physical,
                                            out=None if out is None else out[1], first_z=3, slab_voxels=slab_voxels)
        return [np.asarray(image), np.asarray(nearest), np.asarray(field)]

    with ops.kernel_mode("torch"):
        whole = outputs(2**22, None)
        for slab_voxels in (1, 5 * 21 * 18):
            for out in (None, (np.zeros(shape, np.int16), np.zeros((*shape, 3), np.float32))):
                for got, expected in zip(outputs(slab_voxels, out), whole):
                    np.testing.assert_array_equal(got, expected)
    assert np.std(whole[0]) > 10 and np.abs(whole[2]).max() > 1.0


@pytest.mark.parametrize("pixels", ["int16", pytest.param("uint16", marks=pytest.mark.skipif(
    not hasattr(torch, "uint16"), reason="torch < 2.3 has no uint16 tensors to compare with")), "float32"])
def test_numpy_arrays_give_numpy_arrays_of_the_tensors_values(kernel, pixels):
    """itk_io passes numpy arrays on the CPU (``mgr-engine warp`` and ``jacobian`` run without
    torch where the kernels are built): the same values as from tensors, as numpy arrays."""
    displacement = random_displacement(NETWORK, 0.15, seed=1)
    volume = torch.from_numpy((smooth_volume((13, 17, 11), 3) * 900 + 400).astype(pixels))
    fixed_to_grid, grid_to_index = random_affine(2), random_affine(3)
    with ops.kernel_mode(kernel):
        outputs = {}
        for kind, (d, v) in (("tensor", (displacement, volume)), ("array", (displacement.numpy(), volume.numpy()))):
            field = resample.displacement_field(d, fixed_to_grid, (12, 21, 18), grid_to_index, np.eye(3, 4))
            outputs[kind] = [resample.resampled_image(d, fixed_to_grid, (12, 21, 18), v, grid_to_index, interpolation)
                             for interpolation in ("linear", "nearest")]
            outputs[kind] += [field, resample.jacobian_determinant(field, (1.2, 1.0, 0.9), rotation(0.3, -0.2, 0.5))]
    for from_tensors, from_arrays in zip(outputs["tensor"], outputs["array"]):
        assert isinstance(from_tensors, torch.Tensor) and isinstance(from_arrays, np.ndarray)
        np.testing.assert_array_equal(from_arrays, from_tensors.numpy())
    assert outputs["array"][0].dtype == np.dtype(pixels) and np.std(outputs["array"][0]) > 10


def test_volumes_beyond_the_kernels_32_bit_offsets_take_the_pytorch_path():
    require_cpp_extension(resample_cpu)
    displacement = torch.zeros(4, 5, 6, 3)
    huge = torch.zeros(1).expand(2**11, 2**10, 2**10)  # 2^31 voxels, a view of one
    with ops.kernel_mode("cpp"):
        assert resample.use_cpp_resample(displacement, torch.zeros(7, 8, 9))
        assert not resample.use_cpp_resample(displacement, huge)
        # the displacement's offsets count its three components
        assert resample.use_cpp_resample(torch.zeros(1).expand(682, 2**10, 2**10, 3))  # 2^31 - 2.1e6 components
        assert not resample.use_cpp_resample(torch.zeros(1).expand(683, 2**10, 2**10, 3))  # 2^31 + 1.0e6


def test_no_displacement_outside_the_grid(kernel):
    displacement = random_displacement(NETWORK, 0.15, seed=8)
    far = np.concatenate([np.eye(3), np.full((3, 1), 100.0)], axis=1)  # every fixed voxel lands far outside
    with ops.kernel_mode(kernel):
        field = resample.displacement_field(displacement, far, (3, 4, 5), np.eye(3, 4), np.eye(3, 4))
    torch.testing.assert_close(field, torch.full_like(field, 100.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resampling_on_the_gpu_matches_the_cpu():
    displacement = random_displacement((64, 70, 58), 0.15, seed=9)
    volume = torch.from_numpy(smooth_volume((90, 110, 80), 3))
    fixed_to_grid, grid_to_index = random_affine(10, 20.0), random_affine(11, 20.0)
    fixed_shape = (100, 120, 96)
    for interpolation in ("linear", "nearest"):
        cpu = resample.resampled_image(displacement, fixed_to_grid, fixed_shape, volume, grid_to_index, interpolation)
        gpu = resample.resampled_image(displacement.cuda(), fixed_to_grid, fixed_shape, volume.cuda(), grid_to_index,
                                       interpolation)
        assert gpu.is_cuda
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-9)
        # slabs of 7 slices on the GPU, written into a host tensor: the whole's bits
        out = torch.empty(fixed_shape)
        resample.resampled_image(displacement.cuda(), fixed_to_grid, fixed_shape, volume.cuda(), grid_to_index,
                                 interpolation, out=out, slab_voxels=7 * 120 * 96)
        assert torch.equal(out, gpu.cpu())
    cpu = resample.displacement_field(displacement, fixed_to_grid, fixed_shape, grid_to_index, np.eye(3, 4))
    gpu = resample.displacement_field(displacement.cuda(), fixed_to_grid, fixed_shape, grid_to_index, np.eye(3, 4))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-5)
    slab = resample.displacement_field(displacement.cuda(), fixed_to_grid, (30, 120, 96), grid_to_index, np.eye(3, 4),
                                       first_z=40)  # the Jacobian's slabs
    assert torch.equal(slab, gpu[40:70])
    spacing = (1.2, 1.0, 0.9)
    for direction in (None, rotation(0.3, -0.2, 0.5)):  # along index axes, and physical
        on_gpu = resample.jacobian_determinant(gpu, spacing, direction)
        torch.testing.assert_close(on_gpu.cpu(), resample.jacobian_determinant(cpu, spacing, direction),
                                   rtol=1e-5, atol=1e-5)
        out = torch.empty(fixed_shape)
        resample.jacobian_determinant(gpu, spacing, direction, out=out, slab_voxels=9 * 120 * 96)
        assert torch.equal(out, on_gpu.cpu())


# ---------------------------------------------------------------- against ITK


@pytest.fixture(scope="module")
def itk_module():
    return pytest.importorskip("itk")


def assert_on_grid(image, reference):
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_array_equal(np.asarray(getattr(image, get)()), np.asarray(getattr(reference, get)()))


@pytest.fixture(scope="module")
def registration(itk_module):
    return oblique_registration()


@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_warp_matches_itk_resampling(itk_module, registration, kernel, interpolation):
    from mgr_engine import itk_io

    itk = itk_module
    expected = itk.array_from_image(itk_io.resample(registration.moving, registration.transform, registration.fixed,
                                                    interpolation))
    with ops.kernel_mode(kernel):
        warped = registration.warp(interpolation=interpolation)
    assert type(warped) is type(registration.fixed)
    assert_on_grid(warped, registration.fixed)
    assert 0.05 < (expected == 0).mean() < 0.7, "the test wants points inside and outside the moving image"
    np.testing.assert_allclose(itk.array_from_image(warped), expected, rtol=1e-6, atol=1e-4)


def test_warp_of_an_integer_label_map_and_an_integer_image(itk_module, registration, kernel):
    from mgr_engine import itk_io

    itk = itk_module
    moving = registration.moving
    labels = itk_io.image_like((itk.array_from_image(moving) // 100).astype(np.uint8), moving)
    ct = itk_io.image_like((itk.array_from_image(moving) * 3 - 1000).astype(np.int16), moving)
    with ops.kernel_mode(kernel):
        warped_labels = registration.warp(labels, interpolation="nearest")
        warped_ct = registration.warp(ct)
    expected_labels = itk.array_from_image(itk_io.resample(labels, registration.transform, registration.fixed, "nearest"))
    assert itk.array_from_image(warped_labels).dtype == np.uint8 and len(np.unique(expected_labels)) > 3
    np.testing.assert_array_equal(itk.array_from_image(warped_labels), expected_labels)
    # Linear values are truncated to int16 as ITK does; where the exact value is a whole number
    # the last bit of either side's rounding decides, so a few voxels may differ by 1.
    expected_ct = itk.array_from_image(itk_io.resample(ct, registration.transform, registration.fixed)).astype(int)
    difference = np.abs(itk.array_from_image(warped_ct).astype(int) - expected_ct)
    assert itk.array_from_image(warped_ct).dtype == np.int16
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def test_displacement_field_matches_itk_and_transform_point(itk_module, registration, kernel):
    itk = itk_module
    fixed = registration.fixed
    expected = itk.transform_to_displacement_field_filter(registration.transform, reference_image=fixed,
                                                          use_reference_image=True)
    with ops.kernel_mode(kernel):
        field = registration.displacement_field()
    assert type(field) is type(expected)  # itk.Image[itk.Vector[itk.F, 3], 3], what the Jacobian filter takes
    assert_on_grid(field, fixed)
    array = itk.array_from_image(field)
    assert np.abs(array).max() > 2.0  # mm: a map that moves points
    np.testing.assert_allclose(array, itk.array_from_image(expected), rtol=1e-6, atol=1e-4)
    rng = np.random.default_rng(0)
    for _ in range(20):
        index = [int(rng.integers(n)) for n in fixed.GetLargestPossibleRegion().GetSize()]  # (x, y, z)
        point = np.array(fixed.TransformIndexToPhysicalPoint(index))
        moved = np.array(registration.transform.TransformPoint(point))
        np.testing.assert_allclose(array[index[2], index[1], index[0]], moved - point, atol=1e-4)
    jacobian = itk.displacement_field_jacobian_determinant_filter(expected)
    np.testing.assert_allclose(itk.array_from_image(registration.jacobian_determinant()), itk.array_from_image(jacobian),
                               rtol=1e-5, atol=1e-5)


def test_an_unknown_interpolation_is_a_typed_error(registration):
    from mgr_engine import itk_io
    from mgr_engine.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="linear"):
        registration.warp(interpolation="cubic")
    with pytest.raises(InvalidOptionError, match="linear"):
        itk_io.resample(registration.moving, registration.transform, registration.fixed, "cubic")


def test_the_transforms_field_is_the_maps_displacement_in_network_voxels(itk_module):
    from mgr_engine import itk_io

    itk = itk_module
    phi = random_map(NETWORK, 0.1, seed=13).numpy()
    transform = itk_io.displacement_transform(phi)
    field = transform.GetDisplacementField()
    assert type(field) is itk.Image[itk.Vector[itk.D, 3], 3]
    assert tuple(field.GetLargestPossibleRegion().GetSize()) == tuple(reversed(NETWORK))
    assert tuple(field.GetSpacing()) == (1.0, 1.0, 1.0) and tuple(field.GetOrigin()) == (0.0, 0.0, 0.0)
    identity = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) / (n - 1) for n in NETWORK], indexing="ij"))
    expected = (phi.astype(np.float64) - identity) * (np.asarray(NETWORK, dtype=np.float64) - 1)[:, None, None, None]
    # bit for bit: the same float64 arithmetic as numpy's whole-array form, components (x, y, z)
    np.testing.assert_array_equal(itk.array_from_image(field), np.moveaxis(expected[::-1], 0, -1))
    point = [3.3, 7.1, 5.6]  # (x, y, z) network voxel, between voxel centres
    moved = np.array(transform.TransformPoint(point))
    assert np.abs(moved - point).max() > 0.1


def test_jacobian_determinant_matches_itks_filter(itk_module):
    from mgr_engine import itk_io

    itk = itk_module
    grid = oblique_image(smooth_volume((20, 24, 18), 1), (1.2, 1.0, 0.9), (-10.0, -12.0, -8.0), (0.1, 0.0, 0.2))
    # a field that folds: determinants from below 0 to about 4
    field = np.stack([smooth_volume((20, 24, 18), seed) * 3 for seed in (3, 4, 5)], -1)
    expected = itk.array_from_image(itk.displacement_field_jacobian_determinant_filter(
        itk_io.image_like(field, grid, is_vector=True)))
    assert expected.min() < 0 < 2 < expected.max()
    ours = resample.jacobian_determinant(torch.from_numpy(field), grid.GetSpacing())
    assert ours.dtype == torch.float32 and ours.shape == (20, 24, 18)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("physical", [False, True])
def test_the_jacobian_slab_by_slab_is_the_whole_fields(itk_module, registration, kernel, physical):
    """grid_jacobian_determinant (mgr-engine jacobian; a result's Jacobian without its field)
    computes the field slab by slab: the determinant of the whole field, bit for bit, for slabs
    of one slice, of 7 of the 20 (a shorter last one), and of the whole."""
    from mgr_engine import itk_io

    itk = itk_module
    grid, fixed = registration._grid_transform(), registration.fixed
    slice_voxels = 24 * 18
    with ops.kernel_mode(kernel):
        expected = itk.array_from_image(itk_io.jacobian_determinant(itk_io.grid_displacement_field(grid, fixed), physical))
        for slab_voxels in (1, 7 * slice_voxels, 2**23):
            jacobian = itk_io.grid_jacobian_determinant(grid, fixed, physical, slab_voxels=slab_voxels)
            assert_on_grid(jacobian, fixed)
            np.testing.assert_array_equal(itk.array_from_image(jacobian), expected)
        # a result: without its field, and from the field once it was asked for
        result = RegistrationResult(fixed=fixed, moving=registration.moving, phi_ab=registration.phi_ab)
        without_field = itk.array_from_image(result.jacobian_determinant(physical))
        result.displacement_field()
        np.testing.assert_array_equal(itk.array_from_image(result.jacobian_determinant(physical)), without_field)
    np.testing.assert_array_equal(without_field, expected)
    assert expected.min() < expected.max()


def affine_displacement(grid, affine):
    """The displacement ``affine(p) - p`` (mm) at each voxel's physical point ``p``: (Z, Y, X, 3)."""
    from mgr_engine import itk_io

    to_physical = itk_io.index_to_physical_affine(grid)
    shape = tuple(reversed(grid.GetLargestPossibleRegion().GetSize()))
    points = resample._affine_grid(to_physical, shape, "cpu").numpy()  # (3, Z, Y, X) physical (x, y, z)
    moved = np.einsum("ij,j...->i...", affine[:, :3], points) + affine[:, 3, None, None, None]
    return np.moveaxis(moved - points, 0, -1).astype(np.float32)


@pytest.mark.parametrize("slab_voxels", [2**22, 1000, 7])  # one slab; slabs that do not divide the volume
def test_the_jacobian_summary_is_numpys_over_the_whole_volume(slab_voxels):
    rng = np.random.default_rng(0)
    jacobian = np.exp(rng.normal(0.1, 0.3, (30, 40, 50))).astype(np.float32)
    jacobian[0, 0, :7], jacobian[1, 1, 1] = -0.5, 0.0  # 8 folds
    low, high, folds, spread = resample.jacobian_summary(jacobian, slab_voxels)
    assert (low, high) == (-0.5, float(jacobian.max())) and folds == 100.0 * 8 / jacobian.size
    np.testing.assert_allclose(spread, np.log(jacobian[jacobian > 0].astype(np.float64)).std(), rtol=1e-12)


def test_physical_jacobian_of_an_affine_transform_is_its_determinant(itk_module):
    from mgr_engine import itk_io

    itk = itk_module
    shape = (12, 14, 10)
    affine = np.concatenate([np.array([[1.3, 0.2, 0.0], [0.0, 0.9, 0.3], [0.1, 0.0, 0.7]]), [[2.0], [-1.0], [0.5]]], 1)
    oblique = oblique_image(np.zeros(shape, np.float32), (1.2, 1.0, 0.9), (-10.0, -12.0, -8.0), (0.3, -0.2, 0.5))
    grid = itk_io.ImageGrid.of(oblique)
    field = torch.from_numpy(affine_displacement(oblique, affine))
    physical = resample.jacobian_determinant(field, grid.spacing, grid.direction)[1:-1, 1:-1, 1:-1]  # central differences
    np.testing.assert_allclose(physical.numpy(), np.linalg.det(affine[:, :3]), rtol=1e-4)
    along_index_axes = resample.jacobian_determinant(field, grid.spacing)[1:-1, 1:-1, 1:-1]
    assert np.abs(along_index_axes.numpy() - np.linalg.det(affine[:, :3])).min() > 0.05  # ITK's filter's is not that

    # on an axis-aligned grid the two are ITK's filter's result, edges included
    straight = oblique_image(np.zeros(shape, np.float32), (1.2, 1.0, 0.9), (-10.0, -12.0, -8.0), (0.0, 0.0, 0.0))
    field = affine_displacement(straight, affine)
    expected = itk.array_from_image(itk.displacement_field_jacobian_determinant_filter(
        itk_io.image_like(field, straight, is_vector=True)))
    ours = resample.jacobian_determinant(torch.from_numpy(field), straight.GetSpacing(), np.eye(3))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_the_results_physical_jacobian_of_an_affine_map(itk_module, registration):
    """A map affine on the network grid is an affine transform between the oblique images: its
    physical Jacobian determinant is the determinant of that transform's matrix."""
    from mgr_engine import itk_io

    itk = itk_module
    b = np.array([[1.1, 0.1, 0.0], [0.05, 0.95, 0.1], [0.0, -0.1, 1.2]])  # on network voxels (x, y, z)
    identity = ops.identity_map(NETWORK, dtype=torch.float64)[0]  # (3, D, H, W), channels (z, y, x)
    steps = torch.tensor([n - 1 for n in NETWORK], dtype=torch.float64).reshape(3, 1, 1, 1)
    q = (identity * steps).flip(0)  # network voxels (x, y, z)
    moved = torch.einsum("ij,j...->i...", torch.from_numpy(b), q)
    phi = (moved.flip(0) / steps).float()[None]
    result = RegistrationResult(fixed=registration.fixed, moving=registration.moving, phi_ab=phi)
    matrix = (itk_io.network_to_physical_affine(result.moving, NETWORK)[:, :3] @ b
              @ np.linalg.inv(itk_io.network_to_physical_affine(result.fixed, NETWORK)[:, :3]))
    # two voxels in from each edge: the fixed grid's edge voxels lie beyond the network grid's
    physical = itk.array_from_image(result.jacobian_determinant(physical=True))[2:-2, 2:-2, 2:-2]
    np.testing.assert_allclose(physical, np.linalg.det(matrix), rtol=1e-4)
    default = itk.array_from_image(result.jacobian_determinant())[2:-2, 2:-2, 2:-2]
    assert np.abs(default - np.linalg.det(matrix)).max() > 0.01  # ITK's filter's, on this oblique grid


def test_warp_of_an_image_on_another_grid_in_moving_space(itk_module, registration, kernel):
    """``warp(image)`` takes any image in moving space: here one of coarser, shifted, rotated
    voxels that covers part of the moving image."""
    from mgr_engine import itk_io

    itk = itk_module
    other = oblique_image(smooth_volume((9, 11, 13), 6) * 500, (2.1, 1.7, 1.9), (-4.0, -13.0, 1.0), (0.0, 0.2, -0.1))
    expected = itk.array_from_image(itk_io.resample(other, registration.transform, registration.fixed))
    with ops.kernel_mode(kernel):
        warped = registration.warp(other)
    assert_on_grid(warped, registration.fixed)
    assert 0.05 < (expected == 0).mean() < 0.95
    np.testing.assert_allclose(itk.array_from_image(warped), expected, rtol=1e-6, atol=1e-4)


def test_warp_of_an_integer_image_with_flat_regions_matches_itk(itk_module, kernel):
    """A CT-like image of flat regions (air -1000, tissue 40, bone 300). Between equal voxels ITK's
    linear interpolation is exact (``a + (b - a) * t``); a weighted sum of the eight corners
    landed a rounding below the value as often as not, and truncation to int16 then took 1 off
    (-1000 became -999): 15% of this image's voxels differed from ITK's before the image was
    interpolated in ITK's order of operations."""
    from mgr_engine import itk_io

    itk = itk_module
    volume = smooth_volume((30, 32, 29), 2)
    ct = np.where(volume < 0.3, -1000, np.where(volume < 0.6, 40, 300)).astype(np.int16)
    moving = oblique_image(ct, (1.1, 1.05, 0.95), (-6.0, -15.0, -2.0), (0.15, -0.05, -0.1))
    fixed = oblique_image(np.zeros((32, 30, 31), np.float32), (1.2, 1.0, 0.9), (-10.0, -12.0, -8.0), (0.1, 0.0, 0.2))
    result = RegistrationResult(fixed=fixed, moving=moving, phi_ab=random_map((20, 22, 19), 0.04, seed=3)[None])
    expected = itk.array_from_image(itk_io.resample(moving, result.transform, fixed)).astype(int)
    with ops.kernel_mode(kernel):
        warped = itk.array_from_image(result.warp()).astype(int)
    assert np.isin([-1000, 40, 300], expected).all() and (expected == -1000).mean() > 0.1
    difference = np.abs(warped - expected)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


# ------------------------------------------- transform files of that form (mgr-engine warp, jacobian)


def test_the_engines_transform_file_is_a_grid_transform_of_its_map(itk_module, registration, tmp_path):
    """What ``mgr-engine warp`` and ``jacobian`` evaluate from a file is what the result evaluates:
    the map's displacement in network voxels, between the images' network grids."""
    from mgr_engine import itk_io

    shape = registration.phi_ab.shape[2:]
    grid = itk_io.grid_transform(read_back(registration.transform, tmp_path / "t.h5"))
    assert np.array_equal(grid.displacement, resample.map_displacement(registration.phi_ab[0].numpy()))
    assert np.array_equal(grid.displacement, registration._grid_transform().displacement)
    np.testing.assert_allclose(grid.to_grid, resample.invert_affine(itk_io.network_to_physical_affine(registration.fixed, shape)),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grid.from_grid, itk_io.network_to_physical_affine(registration.moving, shape),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_warp_image_through_a_read_transform_matches_itk(itk_module, registration, kernel, interpolation, tmp_path):
    """A composite of an affine, a field on an oblique grid (displacement in mm), a rotation and a
    translation, read back from a file: evaluated as a grid transform, as ITK evaluates it."""
    from mgr_engine import itk_io

    itk = itk_module
    euler = itk.Euler3DTransform[itk.D].New()
    euler.SetRotation(0.1, -0.05, 0.2)
    euler.SetCenter((1.0, 2.0, -3.0))
    translation = itk.TranslationTransform[itk.D, 3].New()
    translation.SetOffset((1.5, -2.0, 0.5))
    transform = read_back(composite(itk, affine_transform(itk, 20), oblique_field_transform(itk, (9, 11, 10), 4.0, 21),
                                         euler, translation), tmp_path / "t.h5")
    grid = itk_io.grid_transform(transform)
    assert grid is not None and not np.array_equal(grid.displacement, itk.array_view_from_image(
        down_cast_field(itk_io, transform).GetDisplacementField()))  # mm -> grid voxels
    moving, fixed = registration.moving, registration.fixed
    expected = itk.array_from_image(itk_io.resample(moving, transform, fixed, interpolation))
    with ops.kernel_mode(kernel):
        warped = itk_io.warp_image(grid, moving, fixed, interpolation)
    assert type(warped) is type(moving)
    assert_on_grid(warped, fixed)
    assert 0.05 < (expected == 0).mean() < 0.8, "the test wants points inside and outside the moving image"
    np.testing.assert_allclose(itk.array_from_image(warped), expected, rtol=1e-6, atol=1e-4)
    expected_field = itk_io.transform_to_displacement_field(transform, fixed)
    with ops.kernel_mode(kernel):
        field = itk_io.grid_displacement_field(grid, fixed)
    assert type(field) is type(expected_field)
    assert_on_grid(field, fixed)
    assert np.abs(itk.array_from_image(expected_field)).max() > 2.0
    np.testing.assert_allclose(itk.array_from_image(field), itk.array_from_image(expected_field), rtol=1e-6, atol=1e-4)


def down_cast_field(itk_io, transform):
    """The displacement field transform of a composite read from a file."""
    parts = [itk_io.down_cast(transform.GetNthTransform(i)) for i in range(transform.GetNumberOfTransforms())]
    return next(part for part in parts if part.GetNameOfClass() == "DisplacementFieldTransform")


def test_other_transforms_are_left_to_itk(itk_module, tmp_path):
    from mgr_engine import itk_io

    itk = itk_module
    field = oblique_field_transform(itk, (5, 6, 7), 1.0, 22)
    for name, transform in (("affine", affine_transform(itk, 23)),
                            ("two fields", composite(itk, field, affine_transform(itk, 24), field)),
                            ("identity", itk_io.identity_transform())):
        assert itk_io.grid_transform(read_back(transform, tmp_path / f"{name}.h5")) is None, name


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_a_displacement_field_image_is_read_as_the_transform_it_samples(itk_module, registration, suffix, tmp_path):
    """A result's field written as an image (``--displacement_field_out``; ANTs' warp fields) is
    read back as ITK's DisplacementFieldTransform of it: at the fixed voxels it samples (oblique,
    anisotropic), the result's transform up to the field's float32; ``warp`` and ``jacobian``
    take it as they take a transform file."""
    from mgr_engine import itk_io
    from mgr_engine.cli import main

    itk = itk_module
    path = tmp_path / f"field{suffix}"
    itk_io.write_image(registration.displacement_field(), path)
    transform = itk_io.read_transform(path)
    assert transform.GetNameOfClass() == "DisplacementFieldTransform"
    fixed = registration.fixed
    size = itk.size(fixed)
    rng = np.random.default_rng(5)
    voxels = [[int(rng.integers(n)) for n in size] for _ in range(40)]
    for index in voxels:
        point = fixed.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(transform.TransformPoint(point), registration.transform.TransformPoint(point),
                                   rtol=0, atol=1e-4)
    # the commands: as the result's warp and Jacobian, read from the field
    itk_io.write_image(fixed, tmp_path / "fixed.nii.gz")
    itk_io.write_image(registration.moving, tmp_path / "moving.nii.gz")
    assert main(["warp", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz"),
                 "--transform", str(path), "--linear", "--warped_moving_out", str(tmp_path / "w.nii.gz")]) == 0
    np.testing.assert_allclose(itk.array_from_image(itk_io.read_image(tmp_path / "w.nii.gz")),
                               itk.array_from_image(registration.warp()), rtol=1e-5, atol=1e-2)
    assert main(["jacobian", "--fixed", str(tmp_path / "fixed.nii.gz"), "--transform", str(path),
                 "--jacob", str(tmp_path / "j.nii.gz")]) == 0
    np.testing.assert_allclose(itk.array_from_image(itk_io.read_image(tmp_path / "j.nii.gz")),
                               itk.array_from_image(registration.jacobian_determinant()), rtol=1e-4, atol=1e-4)


def test_an_image_that_is_not_a_displacement_field_is_not_a_transform(itk_module, registration, tmp_path):
    from mgr_engine import itk_io
    from mgr_engine.errors import ImageReadError

    itk = itk_module
    itk_io.write_image(registration.fixed, tmp_path / "scalar.nii.gz")
    with pytest.raises(ImageReadError, match=r"is a 3-D image of 1 component per voxel, not a displacement field"):
        itk_io.read_transform(tmp_path / "scalar.nii.gz")
    field = itk.array_from_image(registration.displacement_field())
    field[1, 2, 3, 0] = np.nan
    bad = itk_io.image_like(field, registration.fixed, is_vector=True)
    itk_io.write_image(bad, tmp_path / "nan.mha")
    with pytest.raises(ImageReadError, match="has NaN or infinite displacements"):
        itk_io.read_transform(tmp_path / "nan.mha")
