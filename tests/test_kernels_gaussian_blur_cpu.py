"""The C++ Gaussian blur of LNCC (kernels/gaussian_blur_cpu.py), values and gradients, against
the banded matrix products of the PyTorch path, and the dispatch that picks it for LNCC.

Skipped where the extension was not built, except under ``MGR_ENGINE_REQUIRE_CPP=1`` (set by
``make test``), where a missing build fails instead of hiding.
"""

import pytest
import torch

from helpers import require_cpp_extension, smooth_volume
from mgr_engine import ops
from mgr_engine.kernels import gaussian_blur_cpu
from mgr_engine.losses import LNCC_SIGMA, LNCC_TAPS, gaussian_blur, gaussian_kernel1d, lncc2_loss, target_moments

require_cpp_extension(gaussian_blur_cpu)

# Odd and non-cubic grids; axes shorter than the window's radius (10) and a single voxel, where
# every tap but the centre's falls in the zero padding; one longer than a vector's lanes.
SHAPES = [(7, 9, 11), (1, 12, 5), (23, 4, 37), (30, 31, 2)]
TOLERANCE = {torch.float64: 1e-13, torch.float32: 1e-6}  # relative to the largest value


def taps(dtype, count=LNCC_TAPS, sigma=LNCC_SIGMA):
    return gaussian_kernel1d(count, sigma, dtype=dtype)


def assert_close(got, expected, dtype):
    torch.testing.assert_close(got, expected, rtol=0, atol=TOLERANCE[dtype] * float(expected.detach().abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch,channels", [(1, 3), (2, 1), (2, 5)])
def test_values_and_gradients_match_the_matrix_products(dtype, shape, batch, channels):
    gen = torch.Generator().manual_seed(0)
    volume = torch.randn(batch, channels, *shape, generator=gen, dtype=dtype).requires_grad_()
    kernel = taps(dtype)
    assert gaussian_blur_cpu.supports(volume, kernel)
    got = gaussian_blur_cpu.blur(volume, kernel)
    expected = gaussian_blur_cpu.reference(volume, kernel)
    assert got.shape == expected.shape and got.is_contiguous()
    assert_close(got, expected, dtype)
    grad_out = torch.randn(got.shape, generator=gen, dtype=dtype)
    (got_grad,) = torch.autograd.grad(got, volume, grad_out)
    (expected_grad,) = torch.autograd.grad(expected, volume, grad_out)
    assert_close(got_grad, expected_grad, dtype)


def test_gradcheck_float64_first_and_second_order():
    volume = torch.randn(2, 2, 4, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kernel = taps(torch.float64, count=5, sigma=1.3)  # a short window: most taps land inside
    blur = lambda v: gaussian_blur_cpu.blur(v, kernel)  # noqa: E731
    torch.autograd.gradcheck(blur, (volume.requires_grad_(),))
    torch.autograd.gradgradcheck(blur, (volume,))


def test_strided_input_and_thread_counts():
    """A non-contiguous input is copied; each output voxel is summed by one thread in a fixed
    order, so any team gives the same bits."""
    volume = torch.randn(2, 3, 13, 14, 15, generator=torch.Generator().manual_seed(2)).transpose(2, 4)
    kernel = taps(torch.float32)
    expected = gaussian_blur_cpu.reference(volume, kernel)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 40):  # 40 threads for 30 planes: some get none
            torch.set_num_threads(n)
            results.append(gaussian_blur_cpu.blur(volume, kernel))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)
    assert_close(results[0], expected, torch.float32)


def test_declines_what_it_does_not_compute():
    volume = torch.randn(1, 1, 5, 5, 5)
    assert not gaussian_blur_cpu.supports(volume, taps(torch.float64))  # dtypes differ
    assert not gaussian_blur_cpu.supports(volume.half(), taps(torch.float32).half())
    assert not gaussian_blur_cpu.supports(volume[0], taps(torch.float32))  # 4-D
    assert not gaussian_blur_cpu.supports(volume, torch.tensor([0.2, 0.5, 0.2, 0.1]))  # even
    assert not gaussian_blur_cpu.supports(volume, torch.tensor([0.2, 0.5, 0.3]))  # not symmetric: no adjoint


def test_lncc_takes_it_on_the_cpu_and_equals_pytorch(monkeypatch):
    """In auto mode LNCC's blurs run in C++ (counted: the target's moments once, the image's
    three per call and again in the backward); loss and gradient equal kernel mode "torch"'s."""
    calls = []
    original = gaussian_blur_cpu.GaussianBlurCPU.apply
    monkeypatch.setattr(gaussian_blur_cpu.GaussianBlurCPU, "apply",
                        lambda *args: calls.append(args[0].shape[1]) or original(*args))
    shape = (24, 20, 28)
    image = torch.from_numpy(smooth_volume(shape, 1))[None, None].double()
    target = torch.from_numpy(smooth_volume(shape, 2))[None, None].double()

    def loss_and_gradient():
        moving = image.clone().requires_grad_()
        loss = lncc2_loss(moving, target, moments_of_target=target_moments(target))
        return loss.item(), torch.autograd.grad(loss, moving)[0]

    with ops.kernel_mode("auto"):
        got = loss_and_gradient()
    assert calls == [2, 3, 3]  # target moments, the image's three moments, their backward
    with ops.kernel_mode("torch"):
        expected = loss_and_gradient()
    assert len(calls) == 3
    assert abs(got[0] - expected[0]) < 1e-12
    assert_close(got[1], expected[1], torch.float64)
    assert float(expected[1].abs().max()) > 0
    assert torch.equal(gaussian_blur(image), gaussian_blur_cpu.blur(image, taps(torch.float64)))
