"""The transposed convolutions in C++ (kernels/upconv_cpu.py): the forward in Winograd form
against ``conv_transpose3d`` and the weight gradient against ``convolution_backward``, both in
float64, at every vector width this CPU runs; and the network's layers that take them.

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


def results_by_thread_count(compute):
    """``compute()`` with 1, 2, 3 and 40 threads (more than the work has rows or tiles), each twice:
    asserts that each team size repeats its own bits, and returns one result per team size."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 40):
            torch.set_num_threads(n)
            results.append(compute())
            assert torch.equal(compute(), results[-1])
    finally:
        torch.set_num_threads(threads)
    return results


def assert_thread_counts_agree(compute):
    """One result per team size (:func:`results_by_thread_count`), within float32's rounding
    across team sizes."""
    results = results_by_thread_count(compute)
    for result in results[1:]:
        torch.testing.assert_close(result, results[0], rtol=0, atol=1e-6 * float(results[0].abs().max()))


def assert_same_bits_for_any_thread_count(compute):
    """``compute()`` with 1, 2, 3 and 40 threads gives the same bits."""
    results = results_by_thread_count(compute)
    assert all(torch.equal(result, results[0]) for result in results[1:])


def test_thread_counts_agree_and_repeat_exactly():
    """Each thread sums its share of the rows, the shares then in thread order: one result per
    team size, within float32's rounding across team sizes (more threads than rows included)."""
    x, grad = (t.float().contiguous(memory_format=CL) for t in inputs(2, 8, 16, (5, 3, 6), seed=3)[:2])
    assert_thread_counts_agree(lambda: upconv_cpu.weight_grad(x, grad))


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


def forward_inputs(batch, cin, cout, grid, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, *grid, generator=gen, dtype=torch.float64)
    weight = torch.randn(cin, cout, 4, 4, 4, generator=gen, dtype=torch.float64) / (8 * cin) ** 0.5
    bias = torch.randn(cout, generator=gen, dtype=torch.float64)
    return x, weight, bias


def forward_error_bound(x, weight, bias, slope):
    """8 float32 epsilons of the largest sum of absolute products of an output: float32 inputs
    and sums (the transforms' additions included) stay within a few epsilons of it. Measured on
    the cases below at every width: at most 2.4 epsilons of this scale (0.9-3.9x oneDNN's error)."""
    activated = F.leaky_relu(x, slope) if slope is not None else x
    scale = F.conv_transpose3d(activated.abs(), weight.abs(), None if bias is None else bias.abs(), stride=2,
                               padding=1).max()
    return 8 * torch.finfo(torch.float32).eps * float(scale)


# The weight-gradient cases, plus grids with 1 to 5 tiles left over after a register block of 6
# along x (tiles: n // 2 + 1), the finest level's channels, and 64 output channels (the third
# level's, 192 -> 64).
FORWARD_CASES = CASES + [(1, 48, 16, (5, 4, 21)), (1, 9, 32, (3, 2, 9)), (2, 4, 16, (2, 2, 14)), (1, 24, 64, (3, 4, 5))]


@pytest.mark.parametrize("case", FORWARD_CASES)
@pytest.mark.parametrize("slope", [None, 0.01])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_matches_pytorch(case, slope, with_bias, vector_bytes):
    x, weight, bias = forward_inputs(*case)
    bias = bias if with_bias else None
    expected = upconv_cpu.forward_reference(x, weight, bias, slope)  # float64
    x32 = x.float().contiguous(memory_format=CL)
    weight32, bias32 = weight.float(), None if bias is None else bias.float()
    assert upconv_cpu.supports_forward(x32, weight32, bias32)
    got = upconv_cpu.forward(x32, weight32, bias32, slope)
    assert got.shape == expected.shape and got.dtype == torch.float32 and ops.is_channels_last(got)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=forward_error_bound(x, weight, bias, slope))
    # a planar input is copied to channels-last and gives the same bits
    assert torch.equal(upconv_cpu.forward(x.float(), weight32, bias32, slope), got)


def test_forward_is_the_same_bits_for_any_thread_count():
    """Each tile is summed by one thread in one order, whatever the team size."""
    x, weight, bias = (t.float() for t in forward_inputs(2, 8, 16, (5, 3, 6), seed=5))
    x = x.contiguous(memory_format=CL)
    assert_same_bits_for_any_thread_count(lambda: upconv_cpu.forward(x, weight, bias, 0.01))


def test_forward_declines_what_it_does_not_compute():
    x, weight, bias = (t.float() for t in forward_inputs(1, 4, 16, (2, 3, 4)))
    assert upconv_cpu.supports_forward(x, weight, bias) and upconv_cpu.supports_forward(x, weight)
    assert not upconv_cpu.supports_forward(x.double(), weight.double(), bias.double())  # float32 only
    assert not upconv_cpu.supports_forward(x, weight[:, :8], bias[:8])  # output channels: a multiple of 16
    assert not upconv_cpu.supports_forward(x, weight[..., :3])  # not a kernel of 4
    assert not upconv_cpu.supports_forward(x[:, :3], weight)  # input channels differ
    assert not upconv_cpu.supports_forward(x, weight, bias[:15])
    cl = x.contiguous(memory_format=CL)
    assert not upconv_cpu.takes_forward(cl, weight, bias)  # too few tiles: oneDNN is faster
    big = torch.zeros(1, 4, 18, 18, 18).contiguous(memory_format=CL)  # 10^3 tiles
    assert upconv_cpu.takes_forward(big, weight, bias) == (upconv_cpu.vector_bytes() >= 32)
    assert not upconv_cpu.takes_forward(big.contiguous(), weight, bias)  # planar: left to oneDNN, not copied
    assert upconv_cpu.takes_forward(big, torch.zeros(4, 64, 4, 4, 4)) == (upconv_cpu.vector_bytes() >= 32)
    assert not upconv_cpu.takes_forward(big, torch.zeros(4, 128, 4, 4, 4))  # not measured against oneDNN
    try:
        upconv_cpu.vector_bytes(16)
        assert not upconv_cpu.takes_forward(big, weight, bias)  # SSE2: slower than oneDNN
    finally:
        upconv_cpu.vector_bytes(0)
    with pytest.raises(ValueError, match="twice"):  # the extension checks what it is given
        upconv_cpu._upconv_cpu.upconv_forward(cl.permute(0, 2, 3, 4, 1).numpy(), weight.numpy(), bias.numpy(),
                                              torch.empty(1, 4, 6, 7, 16).numpy(), True, 0.01, 1)


@pytest.mark.parametrize("grad_enabled", [True, False])
@pytest.mark.parametrize("activation", [True, False])
def test_network_transposed_convolutions_take_the_forward(monkeypatch, grad_enabled, activation):
    """``low_memory_conv`` of a channels-last kernel-4 transposed convolution runs its forward
    here where the CPU has AVX2 or AVX-512 (elsewhere oneDNN's), with gradients (IO) and without
    (inference; counted), within float32's rounding of oneDNN's; under ``kernel_mode("torch")``,
    under autocast or for other layers, oneDNN's."""
    gen = torch.Generator().manual_seed(6)
    conv = torch.nn.ConvTranspose3d(20, 32, kernel_size=4, stride=2, padding=1)
    x = torch.randn(1, 20, 18, 19, 20, generator=gen).contiguous(memory_format=CL)  # enough tiles to take it
    calls = []
    kernel = upconv_cpu.forward
    monkeypatch.setattr(upconv_cpu, "forward", lambda *a: calls.append(1) or kernel(*a))
    with torch.set_grad_enabled(grad_enabled):
        with ops.kernel_mode("cpp"):
            ours = model.low_memory_conv(conv, x, activation=activation)
        taken = int(upconv_cpu.vector_bytes() >= 32)
        assert len(calls) == taken and ours.requires_grad == grad_enabled
        with ops.kernel_mode("torch"):
            onednn = model.low_memory_conv(conv, x, activation=activation)
        with ops.kernel_mode("cpp"), torch.autocast("cpu", dtype=torch.bfloat16):
            model.low_memory_conv(conv, x, activation=activation)
        with ops.kernel_mode("cpp"):
            model.low_memory_conv(torch.nn.ConvTranspose3d(20, 32, kernel_size=3, stride=2, padding=1), x)
    assert len(calls) == taken
    slope = model.LEAKY_SLOPE if activation else None
    bound = forward_error_bound(x.double(), conv.weight.detach().double(), conv.bias.detach().double(), slope)
    torch.testing.assert_close(ours, onednn, rtol=0, atol=2 * bound)
    if grad_enabled:  # IO's backward pass is the same either way: the same bits
        grad = torch.randn(ours.shape, generator=gen).contiguous(memory_format=CL)
        for got, expected in zip(torch.autograd.grad(ours, (conv.weight, conv.bias), grad),
                                 torch.autograd.grad(onednn, (conv.weight, conv.bias), grad)):
            assert torch.equal(got, expected)


def input_grad_error_bound(grad, weight, x, slope):
    """8 float32 epsilons of the largest sum of absolute products of an input-gradient voxel, as
    for the forward. Measured on the cases below at every width: at most 1.8 epsilons of it
    (oneDNN's float32 sums: 1.7)."""
    scale = upconv_cpu.input_grad_reference(grad.abs(), weight.abs(), x).max()
    return 8 * torch.finfo(torch.float32).eps * float(scale)


def weight_grad_error_bound(x, grad, slope):
    """The same for the weight gradient: at most 1.8 epsilons of it on the cases below."""
    activated = F.leaky_relu(x, slope) if slope is not None else x
    scale = upconv_cpu.reference(activated.abs(), grad.abs(), torch.zeros(x.shape[1], grad.shape[1], 4, 4, 4)).max()
    return 8 * torch.finfo(torch.float32).eps * float(scale)


# batch, input channels (the gradient's, multiples of 16), output channels, input grid: one to
# three vectors of input channels and a block of three plus one (AVX-512's register block is
# three), odd grids (a last tile of one voxel), a single voxel along x, rows of 27 and 30 tiles
# (more than a block of 24, with 3 and 6 left over), two vectors of output channels; the last
# two have more tiles than the weight gradient sums in float32 (192).
BACKWARD_CASES = [
    (1, 16, 16, (3, 4, 5)),
    (2, 32, 16, (1, 2, 3)),
    (1, 48, 16, (6, 5, 7)),
    (1, 64, 32, (2, 3, 1)),
    (2, 96, 32, (4, 2, 2)),
    (1, 48, 16, (2, 3, 53)),
    (1, 16, 32, (1, 1, 60)),
    (1, 32, 16, (10, 9, 12)),
    (2, 16, 16, (7, 8, 13)),
]


@pytest.mark.parametrize("case", BACKWARD_CASES)
@pytest.mark.parametrize("slope", [None, 0.01])
def test_backward_matches_pytorch(case, slope, vector_bytes):
    x, grad, weight = inputs(*case)
    expected_input = upconv_cpu.input_grad_reference(grad, weight, x, slope)  # float64
    expected_weight = upconv_cpu.reference(F.leaky_relu(x, slope) if slope is not None else x, grad, weight)
    x32, grad32 = (t.float().contiguous(memory_format=CL) for t in (x, grad))
    weight32 = weight.float()
    assert upconv_cpu.supports_backward(grad32, weight32, x32)
    gx, grad_weight = upconv_cpu.backward(grad32, weight32, x32, slope)
    assert gx.shape == x.shape and gx.dtype == torch.float32 and ops.is_channels_last(gx)
    assert grad_weight.shape == weight.shape and grad_weight.dtype == torch.float32
    torch.testing.assert_close(gx.double(), expected_input, rtol=0, atol=input_grad_error_bound(grad, weight, x, slope))
    torch.testing.assert_close(grad_weight.double(), expected_weight, rtol=0,
                               atol=weight_grad_error_bound(x, grad, slope))
    # each alone gives the same bits
    assert torch.equal(upconv_cpu.backward(grad32, weight32, x32, slope, weight_grad=False)[0], gx)
    assert torch.equal(upconv_cpu.backward(grad32, weight32, x32, slope, input_grad=False)[1], grad_weight)
    if slope is not None:  # the leaky ReLU's derivative: where x <= 0, slope times the gradient without it
        plain = upconv_cpu.backward(grad32, weight32, x32, weight_grad=False)[0]
        assert torch.equal(gx, torch.where(x32 > 0, plain, plain * slope))
    # planar inputs are copied to channels-last and give the same bits
    planar = upconv_cpu.backward(grad.float(), weight32, x.float(), slope)
    assert torch.equal(planar[0], gx) and torch.equal(planar[1], grad_weight)


def test_backward_repeats_exactly_and_thread_counts_agree():
    """The input gradient: each tile summed by one thread, the same bits for any team size. The
    weight gradient: the threads' sums added in thread order, one result per team size, within
    float32's rounding across team sizes."""
    x, grad, weight = (t.float().contiguous(memory_format=CL) for t in inputs(2, 32, 16, (5, 3, 6), seed=7))
    assert_same_bits_for_any_thread_count(lambda: upconv_cpu.backward(grad, weight, x, 0.01)[0])
    assert_thread_counts_agree(lambda: upconv_cpu.backward(grad, weight, x, 0.01)[1])


def test_backward_declines_what_it_does_not_compute():
    x, grad, weight = (t.float() for t in inputs(1, 16, 16, (2, 3, 4)))
    assert upconv_cpu.supports_backward(grad, weight, x)
    assert not upconv_cpu.supports_backward(grad.double(), weight.double(), x.double())  # float32 only
    assert not upconv_cpu.supports_backward(grad, weight[:8], x[:, :8])  # input channels: a multiple of 16
    assert not upconv_cpu.supports_backward(grad[:, :8], weight[:, :8], x)  # output channels too
    assert not upconv_cpu.supports_backward(grad[..., :-1], weight, x)  # not twice the input's grid
    assert not upconv_cpu.supports_backward(grad, weight[..., :3], x)  # not a kernel of 4
    assert not upconv_cpu.takes_backward(*(t.contiguous(memory_format=CL) for t in (grad, weight, x)))  # few tiles
    big_x = torch.zeros(1, 16, 20, 20, 20).contiguous(memory_format=CL)  # 10^3 tiles
    big_grad = torch.zeros(1, 16, 40, 40, 40).contiguous(memory_format=CL)
    assert upconv_cpu.takes_backward(big_grad, weight, big_x) == (upconv_cpu.vector_bytes() >= 32)
    assert not upconv_cpu.takes_backward(big_grad.contiguous(), weight, big_x)  # planar: left to oneDNN
    wide = torch.zeros(1, 64, 40, 40, 40).contiguous(memory_format=CL)
    assert upconv_cpu.takes_backward(wide, torch.zeros(16, 64, 4, 4, 4), big_x) == (upconv_cpu.vector_bytes() >= 32)
    wider = torch.zeros(1, 128, 40, 40, 40).contiguous(memory_format=CL)
    assert not upconv_cpu.takes_backward(wider, torch.zeros(16, 128, 4, 4, 4), big_x)  # not measured
    deep_x = torch.zeros(1, 192, 20, 20, 20).contiguous(memory_format=CL)
    deep_weight = torch.zeros(192, 64, 4, 4, 4)
    threads = torch.get_num_threads()
    try:  # the threads' buffers: 34 MiB each at 192 -> 64, 7 threads within the budget, 8 not
        torch.set_num_threads(7)
        assert upconv_cpu.takes_backward(wide, deep_weight, deep_x) == (upconv_cpu.vector_bytes() >= 32)
        torch.set_num_threads(8)
        assert not upconv_cpu.takes_backward(wide, deep_weight, deep_x)
    finally:
        torch.set_num_threads(threads)
    try:
        upconv_cpu.vector_bytes(16)
        assert not upconv_cpu.takes_backward(big_grad, weight, big_x)  # SSE2: not measured against oneDNN
    finally:
        upconv_cpu.vector_bytes(0)
    with pytest.raises(ValueError, match="twice"):  # the extension checks what it is given
        upconv_cpu._upconv_cpu.upconv_backward(torch.zeros(1, 4, 6, 7, 16).numpy(), weight.numpy(),
                                               torch.zeros(1, 2, 3, 4, 16).numpy(),
                                               torch.empty(1, 2, 3, 4, 16).numpy(), torch.empty(0).numpy(), True,
                                               0.01, 1)


@pytest.mark.parametrize("activation", [True, False])
@pytest.mark.parametrize("needs", ["both", "input", "weight"])
def test_io_transposed_convolution_takes_the_backward_pass(monkeypatch, activation, needs):
    """IO's transposed convolution (``low_memory_conv`` with gradients) on channels-last tensors
    whose channels the kernel takes computes the gradients it needs here (counted), the leaky
    ReLU's forward and backward with them: within float32's rounding of oneDNN's, its bias gradient
    the same bits."""
    gen = torch.Generator().manual_seed(8)
    conv = torch.nn.ConvTranspose3d(32, 16, kernel_size=4, stride=2, padding=1)
    conv.weight.requires_grad_(needs != "input")
    x = torch.randn(1, 32, 20, 21, 22, generator=gen).contiguous(memory_format=CL)  # 1210 tiles
    x.requires_grad_(needs != "weight")
    grad = torch.randn(1, 16, 40, 42, 44, generator=gen).contiguous(memory_format=CL)
    wanted = [t for t in (x, conv.weight) if t.requires_grad] + [conv.bias]
    calls = []
    kernel = upconv_cpu.backward
    monkeypatch.setattr(upconv_cpu, "backward", lambda *a, **k: calls.append(k) or kernel(*a, **k))

    def gradients():
        out = model.low_memory_conv(conv, x, activation=activation)
        return torch.autograd.grad(out, wanted, grad)

    with ops.kernel_mode("cpp"):
        ours = gradients()
        taken = int(upconv_cpu.vector_bytes() >= 32)
        assert len(calls) == taken
        assert not taken or calls[0] == {"input_grad": needs != "weight", "weight_grad": needs != "input"}
        with monkeypatch.context() as patch:
            patch.setattr(model, "use_cpp_upconv_backward", lambda *tensors: False)
            patch.setattr(model, "use_cpp_upconv_weight_grad", lambda *tensors: False)
            onednn = gradients()
    assert len(calls) == taken
    assert torch.equal(ours[-1], onednn[-1])
    slope = model.LEAKY_SLOPE if activation else None
    x64, grad64, weight64 = x.detach().double(), grad.double(), conv.weight.detach().double()
    bounds = ([2 * input_grad_error_bound(grad64, weight64, x64, slope)] if x.requires_grad else []) + (
        [2 * weight_grad_error_bound(x64, grad64, slope)] if conv.weight.requires_grad else [])
    for got, expected, bound in zip(ours, onednn, bounds):
        torch.testing.assert_close(got, expected, rtol=0, atol=bound)
    with ops.kernel_mode("torch"):
        assert not ops.use_cpp_upconv_backward(grad, conv.weight, x.detach())
