"""The C++ last convolution of the U-Nets (kernels/last_conv_cpu.py), values and gradients,
against ``F.conv3d``, and the dispatch that picks it on the CPU.

Skipped where the extension was not built, except under ``MGR_ENGINE_REQUIRE_CPP=1`` (set by
``make test``), where a missing build fails instead of hiding.
"""

import pytest
import torch

from helpers import random_network, require_cpp_extension, vector_bytes_fixture
from mgr_engine import ops
from mgr_engine.kernels import last_conv_cpu

require_cpp_extension(last_conv_cpu)

CHANNELS_LAST = torch.channels_last_3d
# Odd and non-cubic grids; one slice deep; rows shorter than one vector and longer than one
# group of vectors (6 x 16 float32 lanes in 64-byte vectors, 3 x 8 in 32-byte ones), ending in
# a partial group and a partial vector, so that the kernel's x padding and tails are exercised.
SHAPES = [(5, 6, 7), (1, 4, 9), (3, 5, 70), (9, 4, 3), (12, 11, 33), (3, 4, 130)]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}  # relative to the largest value


vector_bytes = vector_bytes_fixture(last_conv_cpu)


def inputs(batch, cin, shape, dtype, seed=0, layout=CHANNELS_LAST):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, *shape, generator=gen, dtype=dtype).contiguous(memory_format=layout)
    weight = torch.randn(3, cin, 3, 3, 3, generator=gen, dtype=dtype)
    bias = torch.randn(3, generator=gen, dtype=dtype)
    return x, weight, bias


def assert_close(got, expected, dtype):
    torch.testing.assert_close(got, expected, rtol=0, atol=TOLERANCE[dtype] * float(expected.detach().abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
# 18: the engine's (16 decoder channels and the two images); 32: whole blocks of the input's
# in-register transposition (16 channels at AVX-512, 8 at AVX2) with none left over.
@pytest.mark.parametrize("batch,cin", [(1, 18), (2, 7), (3, 1), (1, 32)])
def test_values_and_gradients_match_conv3d(dtype, shape, batch, cin, vector_bytes):
    x, weight, bias = inputs(batch, cin, shape, dtype)
    x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()
    got = last_conv_cpu.last_conv(x, weight, bias)
    expected = last_conv_cpu.reference(x, weight, bias)
    assert got.shape == expected.shape and got.is_contiguous()
    assert_close(got, expected, dtype)
    grad_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    for a, b in zip(torch.autograd.grad(got, (x, weight, bias), grad_out),
                    torch.autograd.grad(expected, (x, weight, bias), grad_out)):
        assert a.shape == b.shape
        assert_close(a, b, dtype)


def test_gradcheck_float64(vector_bytes):
    x, weight, bias = inputs(2, 3, (3, 4, 5), torch.float64, seed=2)
    torch.autograd.gradcheck(last_conv_cpu.last_conv, (x.requires_grad_(), weight.requires_grad_(),
                                                       bias.requires_grad_()))


@pytest.mark.parametrize("layout", [CHANNELS_LAST, torch.contiguous_format])
def test_recomputed_input_gives_the_same_gradients_and_is_not_kept(layout):
    """With ``recompute_x`` the op keeps the weight and the recipe's tensors, not ``x``, and
    calls the recipe in the backward pass: gradients bit for bit those of the op that keeps
    ``x``."""
    x, weight, bias = inputs(2, 5, (6, 7, 5), torch.float32, seed=5, layout=layout)
    x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()
    calls = []

    def recompute(source):
        calls.append(1)
        return source.clone()

    source = x.detach().clone()
    got = last_conv_cpu.last_conv(x, weight, bias, recompute_x=(recompute, (source,)))
    kept = {t.untyped_storage().data_ptr() for t in got.grad_fn.saved_tensors}
    assert kept == {weight.untyped_storage().data_ptr(), source.untyped_storage().data_ptr()}
    expected = last_conv_cpu.last_conv(x, weight, bias)
    assert torch.equal(got, expected)
    grad_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    for a, b in zip(torch.autograd.grad(got, (x, weight, bias), grad_out),
                    torch.autograd.grad(expected, (x, weight, bias), grad_out)):
        assert torch.equal(a, b)
    assert calls == [1]


def test_planar_input_and_channels_last_weight():
    """A planar input is copied to channels-last; the engine's weights are channels-last
    (its network is); the input gradient comes back channels-last either way."""
    x, weight, bias = inputs(1, 5, (6, 7, 8), torch.float64, seed=3, layout=torch.contiguous_format)
    weight = weight.contiguous(memory_format=CHANNELS_LAST).requires_grad_()
    x.requires_grad_()
    got = last_conv_cpu.last_conv(x, weight, bias)
    assert_close(got, last_conv_cpu.reference(x, weight, bias), torch.float64)
    grad_x, grad_weight = torch.autograd.grad(got.sum(), (x, weight))
    expected = torch.autograd.grad(last_conv_cpu.reference(x, weight, bias).sum(), (x, weight))
    assert_close(grad_x, expected[0], torch.float64)
    assert_close(grad_weight, expected[1], torch.float64)
    assert grad_x.is_contiguous(memory_format=CHANNELS_LAST)


def test_only_the_gradients_asked_for():
    x, weight, bias = inputs(1, 4, (5, 5, 5), torch.float64, seed=4)
    grad_out = torch.randn(1, 3, 5, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for wanted in ((x,), (weight,), (bias,), (x, bias)):
        leaves = [t.detach().requires_grad_(any(t is w for w in wanted)) for t in (x, weight, bias)]
        got = torch.autograd.grad(last_conv_cpu.last_conv(*leaves), [t for t in leaves if t.requires_grad], grad_out)
        expected = torch.autograd.grad(last_conv_cpu.reference(*leaves), [t for t in leaves if t.requires_grad],
                                       grad_out)
        for a, b in zip(got, expected):
            assert_close(a, b, torch.float64)


def test_thread_counts_agree_and_repeat_exactly():
    """Each output and input-gradient voxel is computed by one thread: the same for any team.
    The weight gradient sums per-thread partial sums in a fixed order: the same when repeated
    with the same team, and equal to rounding across teams."""
    x, weight, bias = inputs(2, 6, (7, 5, 9), torch.float32, seed=6)
    x.requires_grad_(), weight.requires_grad_()
    grad_out = torch.randn(2, 3, 7, 5, 9, generator=torch.Generator().manual_seed(7))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 16):  # 16 threads for 14 slices: some get none
            torch.set_num_threads(n)
            out = last_conv_cpu.last_conv(x, weight, bias)
            results.append((out, *torch.autograd.grad(out, (x, weight), grad_out)))
        again = last_conv_cpu.last_conv(x, weight, bias)
        again = (again, *torch.autograd.grad(again, (x, weight), grad_out))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(again, results[-1]))
    for out, grad_x, grad_weight in results:
        assert torch.equal(out, results[0][0]) and torch.equal(grad_x, results[0][1])
        assert_close(grad_weight, results[0][2], torch.float32)


def test_the_network_takes_it_on_the_cpu_and_equals_pytorch():
    """In auto mode each U-Net's last convolution runs in C++ (eager CPU float tensors); a
    traced network keeps PyTorch's; the maps equal the PyTorch path's (float64)."""
    calls = []
    original = last_conv_cpu.LastConvCPU.apply

    def counted(*args):
        calls.append(1)
        return original(*args)

    net = random_network((72, 72, 72), narrow=True, seed=8).double()
    gen = torch.Generator().manual_seed(9)
    moving, fixed = (torch.rand(1, 1, 72, 72, 72, generator=gen, dtype=torch.float64) for _ in range(2))
    with ops.kernel_mode("torch"):
        expected = net(moving, fixed)
    last_conv_cpu.LastConvCPU.apply = counted
    try:
        with ops.kernel_mode("auto"):
            got = net(moving, fixed)
            assert len(calls) == 4  # one per U-Net
            torch.jit.trace(net.unets[0], (moving, fixed), check_trace=False)
            assert len(calls) == 4
    finally:
        last_conv_cpu.LastConvCPU.apply = original
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    with ops.kernel_mode("auto"):
        assert not ops.use_cpp_last_conv(moving.half(), net.unets[0].lastConv)  # float16: PyTorch
