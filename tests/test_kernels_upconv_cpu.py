"""The transposed convolutions' weight gradient in C++ (kernels/upconv_cpu.py) against PyTorch's
``convolution_backward`` in float64, at every vector width this CPU runs, and IO's transposed
convolution that takes it.

Skipped where the extension was not built, except under ``MGR_ENGINE_REQUIRE_CPP=1`` (set by
``make test``), where a missing build fails instead of hiding.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import require_cpp_extension, vector_bytes_fixture
from mgr_engine import model, ops
from mgr_engine.kernels import upconv_cpu

require_cpp_extension(upconv_cpu)

CL = torch.channels_last_3d

# batch, input channels, output channels, input grid: channels beyond and below a register block
# (6 in AVX-512, 2 otherwise), one and two vectors of output channels, a single voxel along x
# (both of its taps at the row's edges), rows of 2 and 7 voxels.
CASES = [
    (1, 5, 16, (3, 4, 5)),
    (2, 7, 32, (1, 2, 3)),
    (1, 13, 16, (6, 5, 7)),
    (1, 3, 16, (2, 3, 1)),
    (2, 12, 48, (4, 2, 2)),
]


vector_bytes = vector_bytes_fixture(upconv_cpu)


def inputs(batch, cin, cout, grid, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, *grid, generator=gen, dtype=torch.float64)
    grad = torch.randn(batch, cout, *(2 * n for n in grid), generator=gen, dtype=torch.float64)
    weight = torch.randn(cin, cout, 4, 4, 4, generator=gen, dtype=torch.float64)
    return x, grad, weight


@pytest.mark.parametrize("case", CASES)
def test_weight_gradient_matches_pytorch(case, vector_bytes):
    x, grad, weight = inputs(*case)
    expected = upconv_cpu.reference(x, grad, weight)  # float64
    x32, grad32 = (t.float().contiguous(memory_format=CL) for t in (x, grad))
    assert upconv_cpu.supports(x32, grad32, weight.float())
    got = upconv_cpu.weight_grad(x32, grad32)
    assert got.shape == weight.shape and got.dtype == torch.float32
    # float32 inputs, float64 sums: within the inputs' rounding of float64's result
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    # planar inputs are copied to channels-last and give the same bits
    assert torch.equal(upconv_cpu.weight_grad(x.float(), grad.float()), got)


def test_thread_counts_agree_and_repeat_exactly():
    """Each thread sums its share of the rows, the shares then in thread order: one result per
    team size, within float32's rounding across team sizes (more threads than rows included)."""
    x, grad = (t.float().contiguous(memory_format=CL) for t in inputs(2, 8, 16, (5, 3, 6), seed=3)[:2])
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 40):
            torch.set_num_threads(n)
            results.append(upconv_cpu.weight_grad(x, grad))
            assert torch.equal(upconv_cpu.weight_grad(x, grad), results[-1])
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        torch.testing.assert_close(result, results[0], rtol=0, atol=1e-6 * float(results[0].abs().max()))


def test_declines_what_it_does_not_compute():
    x, grad, weight = (t.float() for t in inputs(1, 4, 16, (2, 3, 4)))
    assert upconv_cpu.supports(x, grad, weight)
    assert not upconv_cpu.supports(x.double(), grad.double(), weight.double())  # float32 only
    assert not upconv_cpu.supports(x, grad[:, :8], weight[:, :8])  # output channels: a multiple of 16
    assert not upconv_cpu.supports(x, grad[..., :-1], weight)  # not twice the input's grid
    assert not upconv_cpu.supports(x, grad, weight[..., :3])  # not a kernel of 4
    cl = [t.contiguous(memory_format=CL) for t in (x, grad)]
    assert upconv_cpu.takes(*cl, weight)
    assert not upconv_cpu.takes(x, grad, weight)  # planar: left to oneDNN rather than copied
    wide = [t.float().contiguous(memory_format=CL) for t in inputs(1, 4, 64, (2, 3, 4))[:2]]
    assert not upconv_cpu.takes(*wide, torch.zeros(4, 64, 4, 4, 4))  # oneDNN is as fast there


@pytest.mark.parametrize("activation", [True, False])
def test_io_transposed_convolution_takes_it_and_equals_onednn(monkeypatch, activation):
    """A decoder level's transposed convolution with gradients (IO's ``low_memory_conv``) on
    channels-last tensors computes its weight gradient here (counted): the same as oneDNN's to
    float32's rounding (oneDNN's own the less accurate), the other gradients the same bits."""
    gen = torch.Generator().manual_seed(4)
    conv = torch.nn.ConvTranspose3d(20, 32, kernel_size=4, stride=2, padding=1)
    x = torch.randn(1, 20, 9, 10, 11, generator=gen).contiguous(memory_format=CL).requires_grad_()
    grad = torch.randn(1, 32, 18, 20, 22, generator=gen).contiguous(memory_format=CL)
    calls = []
    kernel = upconv_cpu.weight_grad
    monkeypatch.setattr(upconv_cpu, "weight_grad", lambda *a: calls.append(1) or kernel(*a))

    def gradients():
        out = model.low_memory_conv(conv, x, activation=activation)
        return torch.autograd.grad(out, (x, conv.weight, conv.bias), grad)

    with ops.kernel_mode("cpp"):
        ours = gradients()
        assert len(calls) == 1
        with monkeypatch.context() as patch:
            patch.setattr(model, "use_cpp_upconv_weight_grad", lambda *tensors: False)
            onednn = gradients()
    assert len(calls) == 1
    assert torch.equal(ours[0], onednn[0]) and torch.equal(ours[2], onednn[2])
    exact = upconv_cpu.reference(F.leaky_relu(x.detach(), model.LEAKY_SLOPE) if activation else x.detach(),
                                 grad, conv.weight.detach())  # float32 oneDNN, for the scale
    torch.testing.assert_close(ours[1], onednn[1], rtol=0, atol=1e-5 * float(exact.abs().max()))
    with ops.kernel_mode("torch"):
        assert not ops.use_cpp_upconv_weight_grad(x.detach(), grad, conv.weight)
