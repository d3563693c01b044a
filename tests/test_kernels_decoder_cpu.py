"""The C++ decoder (kernels/decoder_cpu.py): the inference epilogue (trilinear 2x upsampling,
multiply-add, crop and concatenation in one pass) and the differentiable upsample-add of IO and
training, against their PyTorch ops, and the networks that take them on the CPU.

Skipped where the extension was not built, except under ``MGR_ENGINE_REQUIRE_CPP=1`` (set by
``make test``), where a missing build fails instead of hiding.
"""

import pytest
import torch

from helpers import eval_batchnorm, random_network, require_cpp_extension, smooth_volume
from mgr_engine import Engine, model, ops
from mgr_engine.engine import gradicon_objective
from mgr_engine.kernels import decoder_cpu
from mgr_engine.losses import lncc2_loss
from mgr_engine.model import official_state_dict

require_cpp_extension()

CL = torch.channels_last_3d


def inputs(batch, in_channels, channels, grid, skip_channels, skip_grid, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def tensor(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).contiguous(memory_format=CL)

    x = tensor(batch, in_channels, *grid)
    y = tensor(batch, channels, *(2 * n for n in grid))
    skip = tensor(batch, skip_channels, *skip_grid)
    scale = torch.randn(1, channels, 1, 1, 1, generator=gen).to(dtype)
    return y, x, scale, skip


CASES = [  # batch, x channels, y channels, x grid, skip channels, skip grid (cropped from 2 x grid or not)
    (1, 5, 3, (3, 4, 5), 2, (5, 8, 9)),
    (2, 4, 4, (2, 3, 2), 3, (4, 6, 4)),
    (1, 48, 16, (6, 7, 5), 2, (11, 13, 9)),
    (1, 40, 32, (3, 5, 4), 3, (6, 9, 8)),  # 16 and 32 channels: the kernel's compile-time channel counts
    (2, 9, 8, (1, 2, 3), 1, (1, 3, 6)),  # a single source voxel along z: both taps clamp to it
]


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("case", CASES)
def test_values_match_the_pytorch_reference(case, dtype, atol):
    y, x, scale, skip = inputs(*case, dtype=dtype)
    assert decoder_cpu.supports(y, x, scale, skip)
    got = decoder_cpu.upsample_add_concat(y, x, scale, skip)
    expected = decoder_cpu.reference(y, x, scale, skip)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, expected, rtol=0, atol=atol * float(expected.abs().max()))
    assert torch.equal(got[:, y.shape[1]:], skip)
    # planar inputs (the encoder's first convolution returns them) are taken as well
    planar = decoder_cpu.upsample_add_concat(y.contiguous(), x.contiguous(), scale, skip.contiguous())
    assert torch.equal(planar, got)


def test_outputs_above_32_mib_are_streamed_with_the_same_values():
    """An output above 32 MiB (the finest level's, 18 x 175^3, is 386 MiB) is written a row at a
    time through a buffer with non-temporal stores (kernels/trilinear_cpu.cpp, stream_bytes): each
    row's partial lines at either end as usual, its whole lines streamed. Rows of 18 x 81 floats
    start at every offset within a line."""
    y, x, scale, skip = inputs(1, 48, 16, (40, 40, 41), 2, (79, 80, 81), torch.float32, seed=2)
    got = decoder_cpu.upsample_add_concat(y, x, scale, skip)
    assert got.numel() * got.element_size() > 32 << 20
    expected = decoder_cpu.reference(y, x, scale, skip)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6 * float(expected.abs().max()))
    assert torch.equal(got[:, y.shape[1]:], skip)


def test_thread_counts_agree_bit_for_bit():
    y, x, scale, skip = inputs(2, 12, 8, (5, 6, 7), 3, (9, 12, 13), torch.float32, seed=1)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(decoder_cpu.upsample_add_concat(y, x, scale, skip))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


def test_declines_what_it_does_not_compute():
    y, x, scale, skip = inputs(1, 5, 3, (3, 4, 5), 2, (5, 8, 9), torch.float32)
    assert not decoder_cpu.supports(y, x[:, :2], scale, skip)  # fewer input channels: torch zero-pads
    assert not decoder_cpu.supports(y.double(), x, scale, skip)
    assert not decoder_cpu.supports(y, x.requires_grad_(), scale, skip)  # IO and training: autograd
    with torch.no_grad():
        assert decoder_cpu.supports(y, x, scale, skip)


def test_inference_network_takes_it_and_equals_pytorch(monkeypatch):
    """The folded, channels-last inference U-Nets on the CPU run every decoder level through the
    kernel (counted), and the network's map equals kernel mode "torch"'s."""
    shape = (72, 68, 76)  # four halvings in the network, five in each U-Net
    net = random_network(shape, narrow=True, seed=2, displacement_scale=0.5)
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    moving = torch.from_numpy(smooth_volume(shape, 3))[None, None]
    fixed = torch.from_numpy(smooth_volume(shape, 4))[None, None]
    calls = []
    kernel = decoder_cpu.upsample_add_concat
    monkeypatch.setattr(decoder_cpu, "upsample_add_concat", lambda *a: calls.append(a[0].shape) or kernel(*a))
    with ops.kernel_mode("cpp"):
        got = engine.predict_map(moving, fixed)
    assert len(calls) == 4 * len(net.config.up_channels)
    with ops.kernel_mode("torch"):
        expected = engine.predict_map(moving, fixed)
    voxels = torch.tensor(shape).view(1, 3, 1, 1, 1) - 1
    assert float(((expected - net.identity_full) * voxels).abs().max()) > 1  # the map moves points
    assert float(((got - expected) * voxels).abs().max()) < 1e-3


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("case", CASES)
def test_upsample_add_values_and_gradients(case, layout):
    y, x, _, _ = inputs(*case, dtype=torch.float64)
    y, x = y.contiguous(memory_format=layout).requires_grad_(), x.contiguous(memory_format=layout).requires_grad_()
    assert decoder_cpu.supports_upsample_add(y, x)
    got = decoder_cpu.upsample_add(y, x)
    expected = y + torch.nn.functional.interpolate(x[:, : y.shape[1]], scale_factor=2, mode="trilinear")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    grad = torch.randn_like(expected)
    got_grads = torch.autograd.grad(got, (y, x), grad)
    for a, b in zip(got_grads, torch.autograd.grad(expected, (y, x), grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # x's gradient in x's layout (autograd adds it to the transposed convolution's, fast only
    # when both layouts agree), the channels the upsampling does not read included
    assert got_grads[1].is_contiguous(memory_format=layout)
    if y.numel() < 1000:  # the numerical Jacobian is dense: (inputs x outputs) doubles
        torch.autograd.gradcheck(decoder_cpu.upsample_add, (y, x))


def test_io_network_takes_the_upsample_add(monkeypatch):
    """IO's network (BatchNorm not folded, weights trainable) runs each decoder level's
    upsample-add in C++ (counted), and the GradICON objective and its weight gradients equal
    those with PyTorch's upsampling and sum (the C++ warp in both). In float64: in float32 the
    gradients differ by 3e-4 (relative L2), the regularizer's finite differences (step 1e-3)
    amplifying the sum's rounding where trilinear gradients jump at voxel boundaries."""
    shape = (72, 68, 76)
    net = random_network(shape, narrow=True, seed=3, displacement_scale=0.5).double().requires_grad_(True)
    moving = torch.from_numpy(smooth_volume(shape, 5))[None, None].double()
    fixed = torch.from_numpy(smooth_volume(shape, 6))[None, None].double()
    calls = []
    kernel = decoder_cpu.upsample_add
    monkeypatch.setattr(decoder_cpu, "upsample_add", lambda *a: calls.append(1) or kernel(*a))

    def objective_and_gradient():
        net.zero_grad(set_to_none=True)
        loss, _, _ = gradicon_objective(net, moving, fixed, lncc2_loss, generator=torch.Generator().manual_seed(0))
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in net.parameters()])

    with ops.kernel_mode("cpp"):
        fused = objective_and_gradient()
        assert len(calls) == 2 * 4 * len(net.config.up_channels)  # both directions, four U-Nets
        with monkeypatch.context() as patch:
            patch.setattr(model, "use_cpp_decoder", lambda *tensors: False)
            unfused = objective_and_gradient()
    assert len(calls) == 2 * 4 * len(net.config.up_channels)
    assert abs(fused[0] / unfused[0] - 1) < 1e-12
    difference = (fused[1] - unfused[1]).norm() / unfused[1].norm()
    assert difference < 1e-10


NORM_CASES = [  # batch, x channels, x grid, skip channels, skip grid (x's cropped, or not)
    (1, 16, (7, 6, 9), 2, (6, 5, 9)),
    (2, 5, (4, 5, 3), 3, (4, 5, 3)),
    (1, 256, (3, 4, 5), 5, (3, 3, 4)),  # many channels: each channel's arithmetic
    (2, 32, (5, 4, 6), 16, (5, 4, 5)),
]


def norm_inputs(batch, channels, grid, skip_channels, skip_grid, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *grid, generator=gen).to(dtype).contiguous(memory_format=CL)
    skip = torch.randn(batch, skip_channels, *skip_grid, generator=gen).to(dtype).contiguous(memory_format=CL)
    return eval_batchnorm(channels, seed=seed, dtype=dtype), x, skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", NORM_CASES)
def test_norm_concat_is_batch_norms_arithmetic(case, dtype, monkeypatch):
    """IO's decoder level output in one pass gives torch's eval-mode BatchNorm, crop and
    concatenation bit for bit (the IO tests against the reference need it), channels-last; the
    model's function takes it (counted)."""
    norm, x, skip = norm_inputs(*case, dtype=dtype)
    assert decoder_cpu.supports_norm_concat(x, skip) and ops.use_cpp_norm_concat(x, skip)
    calls = []
    kernel = decoder_cpu.norm_concat
    monkeypatch.setattr(decoder_cpu, "norm_concat", lambda *a: calls.append(1) or kernel(*a))
    with torch.no_grad():
        expected = model._cropped_cat(norm(x), skip)
        got = model._eval_norm_cropped_cat(x, skip, norm.weight, norm.bias, norm.running_mean, norm.running_var,
                                           norm.eps)
    assert calls == [1]
    assert torch.equal(got, expected) and got.is_contiguous(memory_format=CL)


def reference_norm_concat_backward(grad, x, scale, mean):
    channels = x.shape[1]
    d, h, w = grad.shape[2:]
    grad_x = torch.zeros_like(x)
    grad_x[:, :, :d, :h, :w] = grad[:, :channels] * scale.view(1, -1, 1, 1, 1)
    g = grad[:, :channels].double()
    centred = x[:, :, :d, :h, :w].double() - mean.double().view(1, -1, 1, 1, 1)
    sums = torch.stack([g.sum((0, 2, 3, 4)), (g * centred).sum((0, 2, 3, 4))])
    return grad_x, grad[:, channels:], sums


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", NORM_CASES)
def test_norm_concat_backward_values(case, dtype):
    """Its backward: the input gradient (zero where the crop cut) and the skip's bit for bit,
    BatchNorm's two sums to float64's rounding; only what is asked for."""
    norm, x, skip = norm_inputs(*case, dtype=dtype, seed=1)
    gen = torch.Generator().manual_seed(5)
    grad = torch.randn(x.shape[0], x.shape[1] + skip.shape[1], *skip.shape[2:], generator=gen).to(dtype)
    grad = grad.contiguous(memory_format=CL)
    scale = torch.randn(x.shape[1], generator=gen).to(dtype)
    expected = reference_norm_concat_backward(grad, x, scale, norm.running_mean)
    got = decoder_cpu.norm_concat_backward(grad, x, scale, norm.running_mean, need_x=True, need_skip=True,
                                           need_sums=True)
    assert torch.equal(got[0], expected[0]) and got[0].is_contiguous(memory_format=CL)
    assert torch.equal(got[1], expected[1]) and got[1].is_contiguous(memory_format=CL)
    assert got[2].dtype == torch.float64
    torch.testing.assert_close(got[2], expected[2], rtol=1e-12, atol=1e-12)
    for need in ((False, True, True), (True, False, False), (False, False, True)):
        some = decoder_cpu.norm_concat_backward(grad, x, scale, norm.running_mean, need_x=need[0], need_skip=need[1],
                                                need_sums=need[2])
        for asked, tensor, full in zip(need, some, got):
            assert (tensor is not None) == asked
            assert tensor is None or torch.equal(tensor, full)


def test_norm_concat_backward_over_thread_counts():
    """The gradients do not depend on the thread count; the sums, added per thread, to rounding."""
    norm, x, skip = norm_inputs(2, 12, (9, 8, 7), 3, (8, 8, 6), torch.float32, seed=2)
    grad = torch.randn(2, 15, 8, 8, 6).contiguous(memory_format=CL)
    scale = torch.rand(12) + 0.5
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(decoder_cpu.norm_concat_backward(grad, x, scale, norm.running_mean, need_x=True,
                                                            need_skip=True, need_sums=True))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        assert torch.equal(result[0], results[0][0]) and torch.equal(result[1], results[0][1])
        torch.testing.assert_close(result[2], results[0][2], rtol=1e-12, atol=1e-12)


def test_eval_norm_crop_concat_takes_the_kernel_with_gradients(monkeypatch):
    """IO's BatchNorm-crop-concatenation function runs its backward in C++ for channels-last
    tensors (counted), gradcheck in float64 through it."""
    norm, x, skip = norm_inputs(1, 3, (4, 5, 4), 2, (3, 5, 4), torch.float64, seed=3)
    calls = []
    kernel = decoder_cpu.norm_concat_backward
    monkeypatch.setattr(decoder_cpu, "norm_concat_backward", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    x.requires_grad_(), skip.requires_grad_()
    torch.autograd.gradcheck(
        lambda x, skip, weight, bias: model._EvalNormCropConcat.apply(x, skip, weight, bias, norm.running_mean,
                                                                       norm.running_var, norm.eps),
        (x, skip, norm.weight, norm.bias))
    assert calls


def test_norm_concat_declines_what_it_does_not_compute():
    _, x, skip = norm_inputs(1, 4, (4, 5, 4), 2, (3, 5, 4), torch.float32)
    assert decoder_cpu.supports_norm_concat(x, skip)
    assert not decoder_cpu.supports_norm_concat(x.contiguous(), skip)  # planar: torch's path
    assert not decoder_cpu.supports_norm_concat(x, skip.double())
    assert not decoder_cpu.supports_norm_concat(skip, x)  # skip's grid larger than x's
    assert not decoder_cpu.supports_norm_concat(x, torch.cat([skip, skip]))  # batch sizes differ
    with ops.kernel_mode("torch"):
        assert not ops.use_cpp_norm_concat(x, skip)


def test_io_network_takes_the_norm_concat(monkeypatch):
    """IO's network in the engine's CPU layout (channels-last) runs its decoder levels' BatchNorm,
    crop and concatenation through the C++ pass, forward (again in the backward pass, recomputed)
    and backward (counted): the finest level of each U-Net here, every level at 175^3 (at this
    size torch's convolutions return some encoder outputs planar, which take torch's path). The
    GradICON objective equals torch's path's, its weight gradients to float64's rounding of the
    reordered BatchNorm sums."""
    shape = (72, 68, 76)
    net = random_network(shape, narrow=True, seed=3, displacement_scale=0.5).double().requires_grad_(True)
    net = net.to(memory_format=CL)
    moving = torch.from_numpy(smooth_volume(shape, 5))[None, None].double()
    fixed = torch.from_numpy(smooth_volume(shape, 6))[None, None].double()
    calls = {"norm_concat": 0, "norm_concat_backward": 0}
    for name in calls:
        kernel = getattr(decoder_cpu, name)
        monkeypatch.setattr(decoder_cpu, name, lambda *a, kernel=kernel, name=name, **k: calls.update(
            {name: calls[name] + 1}) or kernel(*a, **k))

    def objective_and_gradient():
        net.zero_grad(set_to_none=True)
        loss, _, _ = gradicon_objective(net, moving, fixed, lncc2_loss, generator=torch.Generator().manual_seed(0))
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in net.parameters()])

    fused = objective_and_gradient()
    levels = calls["norm_concat_backward"]
    assert levels >= 2 * 4 and calls["norm_concat"] == 2 * levels  # both directions, four U-Nets
    with monkeypatch.context() as patch:
        patch.setattr(model, "use_cpp_norm_concat", lambda *tensors: False)
        unfused = objective_and_gradient()
    assert calls == {"norm_concat": 2 * levels, "norm_concat_backward": levels}
    assert fused[0] == unfused[0]
    difference = (fused[1] - unfused[1]).norm() / unfused[1].norm()
    assert difference < 1e-12
