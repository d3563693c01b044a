"""A U-Net's first encoder level in C++ (kernels/encoder_cpu.py) against PyTorch's ops: values and
gradients in float64 (gradcheck included; baseline vectors, as the extension compiles float64),
float32 against float64 at every vector width this CPU runs, and the network that takes it.

Skipped where the extension was not built, except under ``MGR_ENGINE_REQUIRE_CPP=1`` (set by
``make test``), where a missing build fails instead of hiding.
"""

import pytest
import torch

from helpers import randomize_, require_cpp_extension, vector_bytes_fixture
from mgr_engine import ops
from mgr_engine.kernels import encoder_cpu
from mgr_engine.model import LEAKY_SLOPE, UNet

require_cpp_extension(encoder_cpu)

CL = torch.channels_last_3d

# batch, input channels, output channels, input grid: the engine's two images into 16 channels
# on odd, even and mixed grids (a pool window cut by the grid's end, a tap beyond it), two
# voxels along x (one output; avg_pool3d, the reference, takes no axis of one voxel), one,
# three and four input channels, output channels that are not a multiple of any vector (4, 8:
# the narrow and compact models) and several vectors (48).
CASES = [
    (1, 2, 16, (7, 6, 9)),
    (2, 2, 16, (4, 5, 3)),
    (1, 2, 8, (6, 6, 7)),
    (1, 2, 4, (5, 3, 2)),
    (1, 1, 16, (3, 4, 2)),
    (2, 3, 32, (5, 9, 6)),
    (1, 4, 48, (2, 3, 5)),
]

vector_bytes = vector_bytes_fixture(encoder_cpu)


def inputs(batch, cin, cout, grid, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, *grid, generator=gen, dtype=dtype).contiguous(memory_format=CL)
    weight = torch.randn(cout, cin, 3, 3, 3, generator=gen, dtype=dtype)
    bias = torch.randn(cout, generator=gen, dtype=dtype)
    return x, weight, bias


def gradients(function, x, weight, bias, grad):
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    out = function(*leaves, LEAKY_SLOPE)
    return (out, *torch.autograd.grad(out, leaves, grad))


@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_match_pytorch(case):
    """float64: the output and the gradients to x, the weight and the bias within a few units of
    the last place (the sums run in another order than oneDNN's); the weight's and the bias's are
    oneDNN's own."""
    x, weight, bias = inputs(*case)
    assert encoder_cpu.supports(x, weight, bias)
    grad = torch.randn(x.shape[0], weight.shape[0], *((n + 1) // 2 for n in x.shape[2:]), dtype=x.dtype,
                       generator=torch.Generator().manual_seed(1))
    expected = gradients(encoder_cpu.reference, x, weight, bias, grad)
    got = gradients(encoder_cpu.encoder_level, x, weight, bias, grad)
    assert got[0].shape == expected[0].shape and got[0].is_contiguous(memory_format=CL)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_float32_is_within_its_rounding_of_float64(case, vector_bytes):
    x, weight, bias = inputs(*case)
    grad = torch.randn(x.shape[0], weight.shape[0], *((n + 1) // 2 for n in x.shape[2:]), dtype=x.dtype,
                       generator=torch.Generator().manual_seed(2))
    exact = gradients(encoder_cpu.reference, x, weight, bias, grad)
    got = gradients(encoder_cpu.encoder_level, x.float(), weight.float(), bias.float(), grad.float())
    for a, b in zip(got, exact):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-6 * float(b.detach().abs().max()))


def test_gradcheck():
    x, weight, bias = inputs(1, 2, 8, (3, 4, 5))
    x = (x.sign() * (x.abs() + 0.1)).contiguous(memory_format=CL)  # away from leaky_relu's kink at 0
    assert torch.autograd.gradcheck(lambda *t: encoder_cpu.encoder_level(*t, LEAKY_SLOPE),
                                    [t.detach().requires_grad_() for t in (x, weight, bias)])


def test_the_pool_is_avg_pool3d_bit_for_bit():
    """With a zero convolution the output is the bias plus the pooled x on the last channels:
    summed in avg_pool3d's order and scaled by a power of two, the same bits."""
    x, weight, bias = inputs(1, 2, 16, (7, 6, 5), dtype=torch.float32)
    out = encoder_cpu.encoder_level(x, torch.zeros_like(weight), torch.zeros_like(bias), LEAKY_SLOPE)
    assert torch.equal(out[:, 14:], torch.nn.functional.avg_pool3d(x, 2, ceil_mode=True))
    assert not out[:, :14].any()


def test_thread_counts_give_the_same_bits():
    """Each thread writes its own rows, each voxel summed in one order: the same bits for any team."""
    x, weight, bias = inputs(2, 2, 16, (9, 7, 8), dtype=torch.float32, seed=3)
    grad = torch.randn(2, 16, 5, 4, 4, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 40):
            torch.set_num_threads(n)
            results.append(gradients(encoder_cpu.encoder_level, x, weight, bias, grad)[:2])
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result, results[0]))


def test_declines_what_it_does_not_compute():
    x, weight, bias = inputs(1, 2, 16, (4, 4, 4), dtype=torch.float32)
    conv = torch.nn.Conv3d(2, 16, 3, stride=2, padding=1)
    assert encoder_cpu.supports(x, weight, bias) and encoder_cpu.takes(x, conv)
    assert not encoder_cpu.supports(x, weight, None)  # no bias
    assert not encoder_cpu.supports(x.half(), weight.half(), bias.half())
    assert not encoder_cpu.supports(x, weight.double(), bias)  # mixed dtypes
    wide = torch.zeros(1, 16, 4, 4, 4)
    assert not encoder_cpu.supports(wide, torch.zeros(32, 16, 3, 3, 3), torch.zeros(32))  # 16 inputs: oneDNN's
    assert not encoder_cpu.supports(x, torch.zeros(1, 2, 3, 3, 3), torch.zeros(1))  # fewer outputs than inputs
    assert not encoder_cpu.supports(x, torch.zeros(80, 2, 3, 3, 3), torch.zeros(80))  # beyond 64 outputs
    assert not encoder_cpu.takes(x.contiguous(), conv)  # planar: left to oneDNN rather than copied
    for other in (torch.nn.Conv3d(2, 16, 3, stride=1, padding=1), torch.nn.Conv3d(2, 16, 3, stride=2, padding=0),
                  torch.nn.Conv3d(2, 16, 3, stride=2, padding=1, dilation=2),
                  torch.nn.Conv3d(2, 16, 3, stride=2, padding=1, padding_mode="replicate")):
        assert not encoder_cpu.takes(x, other)
    # the kernels are compiled for 16, 32 and 64 padded output channels (a power of two of vectors
    # at every width): 48 would have read past each channel's weights
    out = torch.empty(1, 48, 2, 2, 2).contiguous(memory_format=CL)
    with pytest.raises(ValueError, match="padded to 16, 32 or 64"):
        encoder_cpu._encoder_cpu.encoder_level(x.permute(0, 2, 3, 4, 1).numpy(), torch.zeros(27, 2, 48).numpy(),
                                               torch.zeros(48).numpy(), out.permute(0, 2, 3, 4, 1).numpy(), 0.01, 1)
    assert encoder_cpu._kernel_weight(torch.zeros(48, 2, 3, 3, 3)).shape == (27, 2, 64)
    with ops.kernel_mode("torch"):
        assert not ops.use_cpp_encoder_level(x, conv)
    with ops.kernel_mode("cpp"):
        assert ops.use_cpp_encoder_level(x, conv)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_the_unet_takes_it_for_its_first_level_and_agrees_with_pytorch(monkeypatch, requires_grad):
    """A U-Net (randomized, eval-mode BatchNorm as in IO) on channels-last inputs runs its first
    encoder level here (counted, once a forward) and gives PyTorch's output and gradients to
    float32's rounding; under CPU autocast (bf16) it is left to PyTorch."""
    unet = randomize_(UNet((2, 16, 32, 32), (16, 32, 32)), seed=5).eval().to(memory_format=CL)
    gen = torch.Generator().manual_seed(6)
    moving, fixed = (torch.rand(1, 1, 11, 12, 13, generator=gen) for _ in range(2))
    calls = []
    kernel = encoder_cpu.encoder_level
    monkeypatch.setattr(encoder_cpu, "encoder_level", lambda *a: calls.append(1) or kernel(*a))

    def run(mode):
        m = moving.clone().requires_grad_(requires_grad)
        with ops.kernel_mode(mode):
            out = unet(m, fixed)
            grads = torch.autograd.grad(out.square().sum(), [m] * requires_grad + list(unet.parameters()))
        return out, grads

    ours = run("cpp")
    assert len(calls) == 1
    reference = run("torch")
    assert len(calls) == 1
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1], reference[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    with ops.kernel_mode("cpp"), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        unet(moving, fixed)
    assert len(calls) == 1
