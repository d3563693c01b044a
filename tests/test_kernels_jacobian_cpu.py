"""The C++ Jacobian determinant (kernels/jacobian_cpu.py) against its reference, the tensor form of
mgr_engine.resample, and against ITK's DisplacementFieldJacobianDeterminantFilter, whose arithmetic
both reproduce operation for operation.

Skipped where the extension was not built, except under ``MGR_ENGINE_REQUIRE_CPP=1`` (set by
``make test``), where a missing build fails instead of hiding.
"""

import platform
from unittest import mock

import numpy as np
import pytest
import torch

from helpers import oblique_image, require_cpp_extension, rotation, smooth_volume
from mgr_engine import ops, resample
from mgr_engine.kernels import jacobian_cpu

require_cpp_extension(jacobian_cpu)

# Odd and non-cubic grids; axes of one voxel (no neighbour: a zero derivative) and of two (every
# voxel at an edge); one longer than a vector's lanes.
SHAPES = [(20, 24, 18), (7, 1, 5), (1, 1, 1), (33, 17, 2), (3, 40, 37)]
SPACINGS = [(1.2, 1.0, 0.9), (0.7, 0.3, 1.1), (1.0, 1.0, 1.0), (0.77, 1.3, 2.1), (2.5, 0.6, 0.8)]
DIRECTION = rotation(0.3, -0.2, 0.5)


def folding_field(shape, scale=3.0) -> torch.Tensor:
    """A smooth (Z, Y, X, 3) float32 field (mm) whose determinants go below 0 at this scale."""
    return torch.from_numpy(np.stack([smooth_volume(shape, seed) * scale for seed in (3, 4, 5)], -1))


def both_paths(field, spacing, direction=None):
    with ops.kernel_mode("cpp"):
        assert resample.use_cpp_jacobian(field) and resample.use_cpp_jacobian()
        cpp = resample.jacobian_determinant(field, spacing, direction)
    with ops.kernel_mode("torch"):
        assert not resample.use_cpp_jacobian(field) and not resample.use_cpp_jacobian()
        reference = resample.jacobian_determinant(field, spacing, direction)
    return cpp, reference


@pytest.mark.parametrize("physical", [False, True], ids=["index axes", "physical axes"])
@pytest.mark.parametrize("shape,spacing", list(zip(SHAPES, SPACINGS)))
def test_the_kernel_is_its_reference_bit_for_bit(shape, spacing, physical):
    field = folding_field(shape)
    cpp, reference = both_paths(field, spacing, DIRECTION if physical else None)
    assert cpp.shape == shape and cpp.dtype == torch.float32
    # the same float32 operations in the same order: equal, not close
    assert torch.equal(cpp, reference), float((cpp - reference).abs().max())
    if shape == SHAPES[0]:
        assert cpp.min() < 0 < 2 < cpp.max(), "the test wants folds and expansions"


@pytest.mark.parametrize("physical", [False, True], ids=["index axes", "physical axes"])
def test_the_tensor_form_slab_by_slab_is_the_whole_fields(physical):
    """The tensor form (the GPU's path) bounds its temporaries by going through slabs, each with
    the slice on either side: the whole field's determinant bit for bit, for slabs of one slice,
    of 4 of 13 slices and of the whole, numpy arrays and tensors alike."""
    field = folding_field((13, 10, 12))
    direction = DIRECTION if physical else None
    with ops.kernel_mode("torch"):
        whole = resample.jacobian_determinant(field, SPACINGS[1], direction, slab_voxels=2**23)
        for slab_voxels in (1, 4 * 10 * 12, 2**23):
            assert torch.equal(resample.jacobian_determinant(field, SPACINGS[1], direction, slab_voxels=slab_voxels),
                               whole), slab_voxels
        from_numpy = resample.jacobian_determinant(field.numpy(), SPACINGS[1], direction, slab_voxels=1)
        out = np.full((13, 10, 12), np.nan, np.float32)
        assert resample.jacobian_determinant(field, SPACINGS[1], direction, out=out, slab_voxels=4 * 10 * 12) is out
    assert isinstance(from_numpy, np.ndarray) and np.array_equal(from_numpy, whole.numpy())
    assert np.array_equal(out, whole.numpy())
    assert whole.min() < 0 < 2 < whole.max(), "the test wants folds and expansions"


def test_the_physical_form_differs_from_the_index_form_on_an_oblique_grid():
    """Guards the kernel's physical branch: dropping the direction would pass the test above only
    if the reference dropped it too, which this catches."""
    field = folding_field(SHAPES[0])
    with ops.kernel_mode("cpp"):
        physical = resample.jacobian_determinant(field, SPACINGS[0], DIRECTION)
        index_axes = resample.jacobian_determinant(field, SPACINGS[0])
        identity = resample.jacobian_determinant(field, SPACINGS[0], np.eye(3))
    assert (physical - index_axes).abs().max() > 0.1
    assert torch.equal(identity, index_axes)


def test_any_layout_and_dtype_of_the_field_and_any_thread_count():
    field = folding_field((9, 14, 11))
    expected, _ = both_paths(field, SPACINGS[0])
    as_float64 = field.double()
    channels_first_view = field.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)  # not C-contiguous
    assert not channels_first_view.is_contiguous()
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            for variant in (as_float64, channels_first_view):
                with ops.kernel_mode("cpp"):
                    assert torch.equal(resample.jacobian_determinant(variant, SPACINGS[0]), expected)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["cpp", "torch"])
def test_the_determinant_is_written_into_out_on_either_path(mode):
    """itk_io.jacobian_determinant passes the view of the ITK image the result goes into."""
    field = folding_field((9, 14, 11))
    with ops.kernel_mode(mode):
        expected = resample.jacobian_determinant(field, SPACINGS[0], DIRECTION)
        out = torch.full((9, 14, 11), float("nan"))
        assert resample.jacobian_determinant(field, SPACINGS[0], DIRECTION, out=out) is out
    assert torch.equal(out, expected)


def test_the_extension_refuses_arrays_of_the_wrong_shape():
    from mgr_engine import _jacobian_cpu

    weights = np.full(3, 0.5, np.float32)
    with pytest.raises(ValueError, match="Z, Y, X, 3"):
        _jacobian_cpu.jacobian_determinant(np.zeros((4, 5, 6, 2), np.float32), weights, np.zeros((4, 5, 6), np.float32), 1)
    with pytest.raises(ValueError, match="out is"):
        _jacobian_cpu.jacobian_determinant(np.zeros((4, 5, 6, 3), np.float32), weights, np.zeros((4, 5, 7), np.float32), 1)
    with pytest.raises(ValueError, match="inverse_direction"):
        _jacobian_cpu.physical_jacobian_determinant(np.zeros((4, 5, 6, 3), np.float32), weights,
                                                    np.eye(2, dtype=np.float32), np.zeros((4, 5, 6), np.float32), 1)


@pytest.mark.parametrize("shape,spacing", list(zip(SHAPES, SPACINGS)))
def test_itk_io_gives_itks_filters_result(shape, spacing):
    """``itk_io.jacobian_determinant`` (the engine's and ``mgr-engine jacobian``'s) takes the
    kernel on the CPU; ITK's filter is the reference. ITK's x86-64 wheels, built without fused
    multiply-adds, round exactly as the kernel does; elsewhere ITK's compiler may fuse them."""
    itk = pytest.importorskip("itk")
    from mgr_engine import itk_io

    grid = oblique_image(np.zeros(shape, np.float32), spacing, (-10.0, -12.0, -8.0), (0.1, 0.0, 0.2))
    field = itk_io.image_like(folding_field(shape).numpy(), grid, is_vector=True)
    results = {}
    for mode in ("auto", "torch"):  # the kernel; ITK's filter (what "torch" mode runs here)
        with ops.kernel_mode(mode), mock.patch.object(jacobian_cpu, "jacobian_determinant",
                                                      wraps=jacobian_cpu.jacobian_determinant) as kernel:
            results[mode] = itk_io.jacobian_determinant(field)
        assert kernel.called == (mode == "auto")
    ours, expected = (itk.array_from_image(results[mode]) for mode in ("auto", "torch"))
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_array_equal(np.asarray(getattr(results["auto"], get)()), np.asarray(getattr(field, get)()))
    if platform.machine().lower() in ("x86_64", "amd64"):
        np.testing.assert_array_equal(ours, expected)
    else:
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
