"""The network against the authors' implementation, with every weight randomized."""

import weakref

import pytest
import torch

from helpers import (KERNEL_DEVICE, NARROW, cuda_sync_debug, eval_batchnorm, random_network, randomize_,
                     reference_network, smooth_volume, tensor_core_tf32x3, truncate_to_tf32)
from mgr_engine import Engine, NetworkConfig
from mgr_engine.errors import CheckpointError
from mgr_engine.model import GradICONNetwork, load_official_state_dict, official_state_dict


def pair(shape, batch=1):
    vols = [torch.from_numpy(smooth_volume(shape, seed)) for seed in range(2 * batch)]
    moving = torch.stack(vols[:batch])[:, None]
    fixed = torch.stack(vols[batch:])[:, None]
    return moving, fixed


def reference_map(ref, moving, fixed):
    with torch.no_grad():
        ref.identity_map.isIdentity = True
        return ref.regis_net(moving, fixed)(ref.identity_map)


def voxels(shape):
    return (torch.tensor(shape, dtype=torch.float32) - 1).view(1, 3, 1, 1, 1)


@pytest.mark.parametrize(
    "shape,narrow,batch",
    [((72, 72, 72), False, 1), ((66, 80, 71), True, 2), ((96, 70, 88), True, 1)],
)
def test_maps_equal_reference(shape, narrow, batch):
    net = random_network(shape, narrow=narrow, seed=3, displacement_scale=0.5)
    ref = reference_network(net)
    moving, fixed = pair(shape, batch)
    expected = reference_map(ref, moving, fixed)
    with torch.no_grad():
        ours = net(moving, fixed)
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    folded = engine.predict_map(moving, fixed)
    identity = ref.identity_map
    displacement = ((expected - identity) * voxels(shape)).abs().max()
    assert displacement > 1.0, "randomized network should move voxels, or the comparison is vacuous"
    assert ((ours - expected) * voxels(shape)).abs().max() < 2e-3
    assert ((folded - expected) * voxels(shape)).abs().max() < 2e-3


@pytest.mark.parametrize("shape, layout, dtype, convolved", [
    ((2, 16, 8, 6, 10), torch.channels_last_3d, torch.float32, True),
    ((1, 3, 4, 4, 2), torch.channels_last_3d, torch.float32, True),
    ((1, 2, 7, 6, 5), torch.channels_last_3d, torch.float32, False),  # odd: partial windows
    ((1, 16, 8, 6, 10), torch.contiguous_format, torch.float32, False),
    ((1, 16, 8, 6, 10), torch.channels_last_3d, torch.float64, False),
])
def test_half_resolution_is_average_pooling(monkeypatch, shape, layout, dtype, convolved):
    """The encoder's pooled path: values and gradients of ``F.avg_pool3d(x, 2, ceil_mode=True)``,
    as a depthwise convolution for even channels-last float32 CPU tensors (torch's pooling
    copies those to planar), in their layout."""
    import torch.nn.functional as F

    from mgr_engine import model

    calls, conv3d = [], F.conv3d
    monkeypatch.setattr(F, "conv3d", lambda *args, **kwargs: calls.append(1) or conv3d(*args, **kwargs))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
    got = model.half_resolution(x)
    expected = F.avg_pool3d(x, 2, ceil_mode=True)
    assert bool(calls) == convolved
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert got.is_contiguous(memory_format=torch.channels_last_3d) or not convolved
    grad = torch.randn(got.shape, generator=gen, dtype=dtype)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(expected, x, grad)[0],
                               rtol=1e-6, atol=0)


def test_state_dict_keys_are_the_official_ones():
    net = random_network((72, 72, 72))
    ref = reference_network(net)
    ours = official_state_dict(net)
    theirs = ref.regis_net.state_dict()
    assert list(ours) == list(theirs)
    assert len(ours) == 188
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    n_params = sum(p.numel() for p in net.parameters())
    assert 70.0e6 < n_params < 71.5e6  # 70.7 M, as the official network


def test_loads_official_checkpoint_file_strictly(tmp_path):
    net = random_network((72, 72, 72), narrow=True, seed=5)
    path = tmp_path / "Step_2_final.trch"
    torch.save(official_state_dict(net), path)
    engine = Engine(weights=path, config=net.config, device="cpu")
    # The engine builds its network uninitialized: every parameter and statistic comes from the file.
    loaded, expected = engine.network.state_dict(), net.state_dict()
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name


def checkpoint_error(state, config):
    with pytest.raises(CheckpointError) as info:
        load_official_state_dict(GradICONNetwork(config), state)
    return str(info.value)


def test_checkpoint_mismatch_names_offending_keys():
    config = NetworkConfig(input_shape=(72, 72, 72), **NARROW)
    state = official_state_dict(GradICONNetwork(config))
    missing = dict(state)
    del missing["netPsi.net.lastConv.bias"]
    assert "netPsi.net.lastConv.bias" in checkpoint_error(missing, config)
    extra = dict(state, **{"netPsi.net.extra.weight": torch.zeros(1)})
    assert "netPsi.net.extra.weight" in checkpoint_error(extra, config)
    # the official checkpoint loaded into a narrow network: shapes differ
    official = official_state_dict(GradICONNetwork(NetworkConfig(input_shape=(72, 72, 72))))
    message = checkpoint_error(official, config)
    assert "wrong shape" in message and "netPhi.netPhi.net.netPhi.net.net.downConvs.0.weight" in message


def test_whole_module_state_dict_with_regis_net_prefix_loads():
    net = random_network((72, 72, 72), narrow=True)
    state = {"regis_net." + k: v for k, v in official_state_dict(net).items()}
    fresh = GradICONNetwork(net.config)
    load_official_state_dict(fresh, state)
    assert torch.equal(fresh.unets[3].lastConv.weight, net.unets[3].lastConv.weight)


def test_fresh_network_is_the_identity():
    net = GradICONNetwork(NetworkConfig(input_shape=(72, 72, 72), **NARROW)).eval()
    moving, fixed = pair((72, 72, 72))
    with torch.no_grad():
        assert torch.allclose(net(moving, fixed), net.identity_full, atol=1e-6)


@pytest.mark.slow
def test_official_configuration_at_175_equals_reference():
    shape = (175, 175, 175)
    net = random_network(shape, seed=11, displacement_scale=0.3)
    ref = reference_network(net)
    moving, fixed = pair(shape)
    expected = reference_map(ref, moving, fixed)
    del ref
    engine = Engine(weights=official_state_dict(net), device="cpu")
    folded = engine.predict_map(moving, fixed)
    assert ((expected - net.identity_full) * voxels(shape)).abs().max() > 1.0
    assert ((folded - expected) * voxels(shape)).abs().max() < 2e-3


def test_bf16_precision_runs_in_bf16_and_returns_float32_maps():
    net = random_network((72, 72, 72), seed=3, displacement_scale=0.5)
    moving, fixed = pair((72, 72, 72))
    fp32 = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    bf16 = Engine(weights=official_state_dict(net), config=net.config, device="cpu", precision="bf16")
    exact, low = fp32.predict_map(moving, fixed), bf16.predict_map(moving, fixed)
    assert low.dtype == torch.float32
    difference = ((low - exact) * voxels((72, 72, 72))).abs().max()
    # bf16 really ran (maps differ) and computed the same network (within a couple of voxels). It can
    # move points by more than 0.1 voxel (0.35 here), which is why it is not the default.
    assert 0 < difference < 2


@pytest.mark.slow
def test_compiled_forward_equals_eager():
    """U-Nets three levels deep: inductor compiles one C++ kernel per fused op and shape, about
    4 s each on 2 cores without a cache (as in CI): 53 kernels and 207 s at the official depth
    (five levels, narrow channels, 72^3), 42 kernels and 168 s here.
    The depth is a loop of the same modules, so a shallower network compiles the same code."""
    shape = (40, 44, 48)
    config = NetworkConfig(input_shape=shape, down_channels=(2, 4, 8, 8), up_channels=(4, 8, 8))
    net = randomize_(GradICONNetwork(config), seed=3, displacement_scale=0.5)
    moving, fixed = pair(shape)
    eager = Engine(weights=official_state_dict(net), config=config, device="cpu")
    compiled = Engine(weights=official_state_dict(net), config=config, device="cpu", compile=True)
    expected = eager.predict_map(moving, fixed)
    assert ((expected - eager.network.identity_full) * voxels(shape)).abs().max() > 1.0  # the map moves points
    difference = ((compiled.predict_map(moving, fixed) - expected) * voxels(shape)).abs().max()
    assert difference < 1e-3


def test_predict_map_copies_what_cuda_graphs_would_overwrite():
    """With CUDA graphs (``compile=True`` on CUDA) the network writes every call's map into the
    same memory, so ``predict_map`` returns a copy; elsewhere the network's own tensor (a
    contiguous float32 map, as the Triton path returns it, goes out unchanged)."""
    net = random_network((72, 72, 72), narrow=True, seed=3)
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    moving, fixed = pair((72, 72, 72))
    static_output = torch.rand(1, 3, 72, 72, 72)
    engine.inference_network = lambda moving, fixed: static_output
    assert engine.predict_map(moving, fixed) is static_output
    engine._outputs_reused = True  # as Engine(compile=True, device="cuda") sets it
    phi = engine.predict_map(moving, fixed)
    assert phi.untyped_storage().data_ptr() != static_output.untyped_storage().data_ptr()
    torch.testing.assert_close(phi, static_output, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_predict_map_on_gpu_tensors_does_not_wait_for_the_gpu(precision):
    """A registration without IO, of tensors already on the GPU, only queues its work: torch
    reports no synchronization, so the host can prepare the next pair meanwhile."""
    net = random_network((72, 72, 72), narrow=True, seed=3, displacement_scale=0.5)
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cuda", precision=precision)
    moving, fixed = (image.cuda() for image in pair((72, 72, 72)))
    expected = engine.predict_map(moving, fixed)  # compiles the kernels
    with cuda_sync_debug("error"):
        phi = engine.predict_map(moving, fixed)
    torch.testing.assert_close(phi, expected)  # not bit for bit: cuDNN may pick a nondeterministic algorithm


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("x_grid", [(5, 5, 6), (6, 5, 7)])
def test_decoder_crop_concat_gradients_keep_the_layouts(layout, x_grid):
    """The decoder's crop to the skip's grid and concatenation: values and gradients of
    ``cat([x[crop], skip])``, each gradient in its input's memory layout (autograd's are
    strided slices and a planar zero tensor, which slowed the BatchNorm backward of
    channels-last networks)."""
    from mgr_engine.model import crop_concat

    x = torch.randn(1, 4, *x_grid, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    skip = torch.randn(1, 3, 5, 5, 6, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    grad_out = torch.randn(1, 7, 5, 5, 6, dtype=torch.float64).contiguous(memory_format=layout)
    got = crop_concat(x, skip)
    expected = torch.cat([x[:, :, :5, :5, :6], skip], 1)
    assert torch.equal(got, expected)
    got_grads = torch.autograd.grad(got, (x, skip), grad_out)
    expected_grads = torch.autograd.grad(expected, (x, skip), grad_out)
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        assert torch.equal(got_grad, expected_grad)
        assert got_grad.is_contiguous(memory_format=layout)
    torch.autograd.gradcheck(crop_concat, (x, skip))


def plain_conv(conv, x, activation=True, recompute_x=None):
    return conv(torch.nn.functional.leaky_relu(x) if activation else x)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("grads", ["all", "weights only", "input only"])
@pytest.mark.parametrize("activation,recompute", [(True, False), (True, True), (False, True)])
def test_low_memory_conv_equals_autograd(transposed, layout, grads, activation, recompute):
    """The U-Net's ``conv(leaky_relu(x))`` (or ``conv(x)``) that keeps only ``x``, or nothing of
    ``x`` where it can be recomputed: values and the gradients of x, weight and bias equal
    autograd's, over odd grids, batch 2, both layer kinds; what the node keeps."""
    from mgr_engine.model import _LowMemoryConv, low_memory_conv

    torch.manual_seed(3)
    conv = (torch.nn.ConvTranspose3d(5, 3, 4, padding=1, stride=2) if transposed
            else torch.nn.Conv3d(3, 5, 3, padding=1, stride=2)).double()
    conv.requires_grad_(grads != "input only")
    x = torch.randn(2, conv.in_channels, 7, 6, 5, dtype=torch.float64).contiguous(memory_format=layout)
    x.requires_grad_(grads != "weights only")
    # Recomputed from a copy of x, so that x itself is not among the saved tensors.
    recompute_x = (lambda source: source.clone(), (x.detach().clone(),)) if recompute else None
    inputs = [t for t in (x, conv.weight, conv.bias) if t.requires_grad]
    got = low_memory_conv(conv, x, activation=activation, recompute_x=recompute_x)
    expected = plain_conv(conv, x, activation)
    assert type(got.grad_fn).__name__ == "_LowMemoryConvBackward"
    kept = [t.untyped_storage().data_ptr() for t in got.grad_fn.saved_tensors]
    assert (x.untyped_storage().data_ptr() in kept) == (not recompute)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(expected)
    for got_grad, expected_grad in zip(torch.autograd.grad(got, inputs, grad_out),
                                       torch.autograd.grad(expected, inputs, grad_out)):
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-10, atol=1e-12)
    if grads == "all":  # against finite differences too, on a smaller grid (4, 3, 5): gradcheck takes a
        # backward pass per output element (10k above for the transposed layer: 25-45 s a case). Not
        # in fast mode, which missed a gradient of x 1% off. A transposed layer's forward here in
        # sub-pixel form, as on a GPU (its plain form is autograd's, compared above).
        small = x.detach()[:1, :, :4, :3, :5].contiguous(memory_format=layout).requires_grad_()
        recompute_small = (lambda source: source.clone(), (small.detach().clone(),)) if recompute else None
        torch.autograd.gradcheck(lambda x, weight, bias: _LowMemoryConv.apply(
            x, weight, bias, conv.stride[0], conv.padding[0], transposed, activation, recompute_small, transposed,
            False),
            (small, conv.weight, conv.bias))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("shape", [(1, 16, 12, 11, 10), (2, 3, 17, 9, 8), (1, 5, 3, 2, 4)])
def test_channel_sums(shape, layout):
    """The transposed convolutions' bias gradient on the CPU: the sum over samples and voxels
    per channel, in blocks of voxels for channels-last tensors (whole blocks and the rest)."""
    from mgr_engine.model import _channel_sums

    t = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=layout)
    torch.testing.assert_close(_channel_sums(t), t.sum((0, 2, 3, 4)), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("layer", [
    torch.nn.Conv3d(3, 4, 3, padding=2, dilation=2), torch.nn.Conv3d(4, 4, 3, padding=1, groups=2),
    torch.nn.Conv3d(3, 4, 3, stride=(1, 2, 1), padding=1), torch.nn.Conv3d(3, 4, 3, padding=1, padding_mode="reflect"),
    torch.nn.ConvTranspose3d(4, 3, 4, stride=2, padding=1, output_padding=1)])
def test_low_memory_conv_leaves_other_layers_to_autograd(layer):
    """A layer whose geometry _LowMemoryConv does not pass on takes autograd's path, exactly."""
    from mgr_engine.model import low_memory_conv

    layer = layer.double()
    x = torch.randn(1, layer.in_channels, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    got = low_memory_conv(layer, x, recompute_x=(lambda source: source.clone(), (x.detach().clone(),)))
    assert type(got.grad_fn).__name__ != "_LowMemoryConvBackward"
    assert torch.equal(got, plain_conv(layer, x))


@pytest.mark.parametrize("disposable", [False, True])
def test_tf32x3_is_as_accurate_as_float32_where_one_tf32_product_is_not(disposable):
    """Three products of TF32 operands (float32 convolutions of rounded operands stand in for a
    tensor core's) give a convolution to float32's accuracy; one is 3e-4 off. ``a_disposable``
    overwrites the first operand, and only then."""
    from mgr_engine.model import round_to_tf32

    torch.manual_seed(0)
    x, weight = torch.randn(1, 16, 12, 11, 10), 0.05 * torch.randn(8, 16, 3, 3, 3)
    exact = torch.nn.functional.conv3d(x.double(), weight.double(), padding=1)

    def conv(a, b):
        return torch.nn.functional.conv3d(a, b, padding=1)

    def error(y):
        return ((y.double() - exact).abs().max() / exact.abs().max()).item()

    first = x.clone()
    split = error(tensor_core_tf32x3(conv, first, weight, a_disposable=disposable))
    float32 = error(conv(x, weight))
    assert error(conv(round_to_tf32(x), round_to_tf32(weight))) > 1e-4
    assert split < max(3 * float32, 2e-6), (split, float32)
    assert torch.equal(first, x) != disposable


@pytest.mark.parametrize("disposable", [False, True], ids=["a kept", "a disposable"])
@pytest.mark.parametrize("a_size,b_size", [(4, 1), (1, 4)], ids=["a larger", "b larger"])
def test_tf32x3_copies_each_operand_once_and_the_smaller_twice_where_a_is_kept(disposable, a_size, b_size):
    """Beside the operands, tf32x3 holds at once one copy of each (its high part, which becomes
    its remainder in place after its last product, or ``a`` itself where it may be overwritten)
    and, where ``a`` is kept, the smaller one's remainder: at IO's full-resolution layers the
    larger operand is a 0.3 GiB activation or gradient. (It held two copies of ``b``, and of a
    kept ``a``, at once: the tensor peak of IO in tf32x3 at 175^3 was 3.91 GiB, fp32's 3.63.)"""
    from helpers import peak_memory
    from mgr_engine.model import tf32x3

    unit = 1 << 16  # floats
    a, b = torch.randn(a_size * unit), torch.randn(b_size * unit)

    def call():
        first = a.clone() if disposable else a  # a copy for tf32x3 to overwrite
        return tf32x3(lambda p, q: torch.dot(p[:unit], q[:unit]), first, b, a_disposable=disposable)

    operands = (a_size + b_size + (a_size if disposable else 0)) * unit * 4
    copies = a_size + b_size + (0 if disposable else min(a_size, b_size))
    peak, _ = peak_memory(call, "cpu")
    assert copies * unit * 4 <= peak - operands < copies * unit * 4 + 1024, (peak - operands) / (unit * 4)


@pytest.mark.parametrize("kind", ["conv", "strided conv", "transposed", "subpixel"])
@pytest.mark.parametrize("activation,recompute", [(True, False), (True, True), (False, True), (False, False)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d], ids=["planar", "channels-last"])
def test_low_memory_conv_in_tf32x3(monkeypatch, kind, activation, recompute, layout):
    """Where :func:`splits_tf32` (IO in precision "tf32x3" on CUDA), the convolution, its input
    gradient and its weight gradient are each one :func:`tf32x3` of TF32 products, and they and
    the bias gradient have float32's accuracy against float64. On the CPU, float32 products of
    TF32-truncated operands stand in for tensor cores (whichever way those round, the high parts
    must reach them exact); on CUDA, cuDNN's TF32 (switched on)."""
    import copy

    from mgr_engine import model

    torch.manual_seed(5)
    if kind in ("transposed", "subpixel"):
        conv = torch.nn.ConvTranspose3d(6, 4, 4, padding=1, stride=2)
    else:
        conv = torch.nn.Conv3d(6, 4, 3, padding=1, stride=2 if kind == "strided conv" else 1)
    conv = conv.to(KERNEL_DEVICE, memory_format=layout)
    x = torch.randn(2, 6, 7, 6, 5, device=KERNEL_DEVICE).contiguous(memory_format=layout).requires_grad_()
    x_before = x.detach().clone()
    recompute_x = (lambda source: source.clone(), (x.detach().clone(),)) if recompute else None
    monkeypatch.setattr(model, "uses_subpixel_upconvs", lambda device: kind == "subpixel")
    monkeypatch.setattr(model, "splits_tf32", lambda x: True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    products, split = [], model.tf32x3

    def counted(product, a, b, **options):
        products.append(product)
        if KERNEL_DEVICE == "cpu":  # a tensor core that truncates: the split must not rely on how it rounds
            return split(lambda p, q: product(truncate_to_tf32(p), truncate_to_tf32(q)), a, b, **options)
        return split(product, a, b, **options)

    monkeypatch.setattr(model, "tf32x3", counted)
    out = model.low_memory_conv(conv, x, activation=activation, recompute_x=recompute_x)
    grad = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, [x, conv.weight, conv.bias], grad))
    assert len(products) == 3  # forward, input gradient, weight gradient
    assert torch.equal(x, x_before)  # overwritten only where the function made its own copy
    conv64, x64 = copy.deepcopy(conv).double(), x.detach().double().requires_grad_()
    out64 = plain_conv(conv64, x64, activation)
    expected = (out64, *torch.autograd.grad(out64, [x64, conv64.weight, conv64.bias], grad.double()))
    for name, got_tensor, expected_tensor in zip(("output", "x", "weight", "bias"), got, expected):
        error = (got_tensor.double() - expected_tensor).abs().max() / expected_tensor.abs().max()
        assert error < 1e-5, (name, error.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unet_keeps_less_for_backward_with_the_same_gradients(monkeypatch, dtype):
    """With gradients and BatchNorm in eval mode (as in IO), a U-Net keeps neither the
    activations' outputs nor the decoder levels' outputs, which the layers after them recompute:
    the bytes autograd keeps fall by exactly those (3.3 GiB of an IO step at 175^3), and every
    gradient is bit for bit autograd's (but for the transposed convolutions' bias gradients,
    summed in another order), in float32 and float64, the last convolution the C++ one on the
    CPU (the recomputation repeats the forward's own ops)."""
    from helpers import kept_for_backward
    from mgr_engine import model

    unet = random_network((72, 72, 72), narrow=True, seed=4).unets[3].to(dtype)
    moving, fixed = (v.to(dtype).requires_grad_() for v in pair((40, 36, 34)))
    parameters = [moving, fixed, *unet.parameters()]

    decoder_outputs = []
    recipe = model.decoder_output_recipe

    def recording_recipe(norm, before_norm, skip):
        recompute, tensors = recipe(norm, before_norm, skip)
        decoder_outputs.append(recompute(*tensors).untyped_storage().nbytes())
        return recompute, tensors

    monkeypatch.setattr(model, "decoder_output_recipe", recording_recipe)
    out = unet(moving, fixed)
    kept_low, _ = kept_for_backward(out)
    grad_out = torch.randn_like(out)
    grads_low = torch.autograd.grad(out, parameters, grad_out)

    activations = []

    def recording_plain(conv, x, activation=True, recompute_x=None):
        if activation:
            x = torch.nn.functional.leaky_relu(x)
            activations.append(x.untyped_storage().nbytes())
        return conv(x)

    monkeypatch.setattr(model, "low_memory_conv", recording_plain)
    monkeypatch.setattr(model, "decoder_output_recipe", lambda *args: None)
    out_plain = unet(moving, fixed)
    kept_plain, _ = kept_for_backward(out_plain)
    grads_plain = torch.autograd.grad(out_plain, parameters, grad_out)

    assert torch.equal(out, out_plain)
    # The transposed convolutions' bias gradients excepted: sums of the output gradient, which
    # autograd takes from oneDNN's reference loop on the CPU, slower and in another order
    sums = {id(conv.bias) for conv in unet.upConvs}
    for parameter, low, plain in zip(parameters, grads_low, grads_plain):
        if id(parameter) in sums:
            torch.testing.assert_close(low, plain, rtol=1e-4 if dtype == torch.float32 else 1e-12, atol=0)
        else:
            assert torch.equal(low, plain)
    levels = len(unet.upConvs)
    assert len(activations) == 2 * levels and len(decoder_outputs) == levels
    # (The images require gradients here, as the warped moving image does in IO: autograd's
    # first activation keeps them too.)
    assert kept_plain - kept_low == sum(activations) + sum(decoder_outputs) > 0


def test_kept_for_backward_counts_a_function_that_saved_an_absent_input():
    """A custom Function saves None for an optional input left out (the LNCC kernel's mask):
    the memory profile of an IO step on a GPU stopped there with an AttributeError."""
    from helpers import kept_for_backward

    class Doubled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, mask):
            ctx.save_for_backward(x, mask)
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad, None

    x = torch.ones(4, 5, requires_grad=True)
    total, by_node = kept_for_backward(Doubled.apply(x, None))
    assert total == x.untyped_storage().nbytes()
    assert by_node == {("Doubled", (4, 5)): [1, total]}


def test_unet_frees_what_it_recomputes_from_once_backward_ran(monkeypatch):
    """The tensors a decoder level's output is recomputed from are freed by the backward pass,
    as autograd's saved tensors are, while the graph lives on: IO's ``loss`` holds the graph
    until the next step's forward has ended, and a closure holding those tensors kept them alive
    into that forward."""
    from mgr_engine import model

    unet = random_network((72, 72, 72), narrow=True, seed=4).unets[3].requires_grad_(True)
    moving, fixed = pair((40, 36, 34))
    recorded = []
    recipe = model.decoder_output_recipe

    def recording_recipe(norm, before_norm, skip):
        recorded.extend(weakref.ref(t) for t in (before_norm, skip))
        return recipe(norm, before_norm, skip)

    monkeypatch.setattr(model, "decoder_output_recipe", recording_recipe)
    out = unet(moving, fixed)
    assert len(recorded) == 2 * len(unet.upConvs) and all(ref() is not None for ref in recorded)
    out.sum().backward()
    assert [ref() for ref in recorded] == [None] * len(recorded)


@pytest.mark.parametrize("folded", [False, True], ids=["with gradients", "inference copy"])
def test_unet_drops_each_decoder_level_before_the_last_convolution(monkeypatch, folded):
    """No transposed convolution's output is alive once the last convolution runs: the decoder
    loop's names held the full-resolution level's (and the level below's output) through its
    BatchNorm, concatenation and the last convolution, 0.45 GiB of IO's peak at 175^3 under
    io_checkpointing."""
    from mgr_engine import model, ops

    net = random_network((72, 72, 72), narrow=True, seed=4)
    unet = (model.inference_network(net, subpixel_upconvs=False) if folded else net.requires_grad_(True)).unets[3]
    moving, fixed = pair((40, 36, 34))
    upconv_outputs, alive_at_last_conv = [], []
    plain = model.low_memory_conv

    def recording(conv, x, **options):
        if conv is unet.lastConv:
            alive_at_last_conv.extend(output() is not None for output in upconv_outputs)
        out = plain(conv, x, **options)
        if any(conv is up for up in unet.upConvs):
            upconv_outputs.append(weakref.ref(out))
        return out

    monkeypatch.setattr(model, "low_memory_conv", recording)
    with ops.kernel_mode("torch"):  # the last convolution through low_memory_conv, not the C++ one
        unet(moving, fixed)
    assert alive_at_last_conv == [False] * len(unet.upConvs)


def test_checkpointed_unet_recomputes_decoder_outputs_in_its_recomputation(monkeypatch):
    """Under io_checkpointing the U-Net's forward runs again in the backward pass, with
    gradients: there too the layers after each decoder level get its recipe instead of keeping
    its output (at 175^3 that level's concatenation, 0.37 GiB, was alive at IO's peak)."""
    from mgr_engine import model

    net = random_network((72, 72, 72), narrow=True, seed=4).requires_grad_(True)
    net.checkpoint_unets = True
    recipes, recipe = [], model.decoder_output_recipe

    def recording_recipe(norm, before_norm, skip):
        recipes.append(recipe(norm, before_norm, skip))
        return recipes[-1]

    monkeypatch.setattr(model, "decoder_output_recipe", recording_recipe)
    moving, fixed = pair((40, 36, 34))
    net._run_unet(net.unets[3], moving, fixed).sum().backward()
    # each level's recipe in the first forward and in its recomputation
    assert len(recipes) == 2 * len(net.unets[3].upConvs) and all(r is not None for r in recipes)


def test_finest_level_is_recomputed_only_through_eval_batchnorm():
    """A training-mode BatchNorm's forward updates its running statistics, so running the finest
    level again in the backward pass would update them twice: ``recompute_finest_level`` acts
    in eval mode (IO) only, and a training step counts one batch and the same statistics."""
    import copy

    net = random_network((72, 72, 72), narrow=True, seed=4)
    moving, fixed = pair((40, 36, 34))
    statistics = []
    for recompute in (False, True):
        unet = copy.deepcopy(net.unets[3]).train().requires_grad_(True)
        unet(moving, fixed, recompute_finest_level=recompute).sum().backward()
        assert [int(norm.num_batches_tracked) for norm in unet.batchNorms] == [1] * len(unet.batchNorms)
        statistics.append([torch.cat([norm.running_mean, norm.running_var]) for norm in unet.batchNorms])
    for kept, recomputed in zip(*statistics):
        torch.testing.assert_close(kept, recomputed, rtol=0, atol=0)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d], ids=["planar", "channels-last"])
@pytest.mark.parametrize("cropped", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_norm_crop_concat_equals_autograds_chain(layout, cropped, dtype):
    """IO's BatchNorm, crop and concatenation in one function, its input gradient computed in
    place: the output bit for bit, the gradients of the input, the skip, BatchNorm's weight and
    bias as autograd's chain of BatchNorm and _CropConcat gives them, in the inputs' layouts."""
    from mgr_engine.model import _EvalNormCropConcat, crop_concat, norm_crop_concat

    norm = eval_batchnorm(4, seed=1, dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 6, 7, 5 + cropped, generator=gen, dtype=dtype).contiguous(memory_format=layout)
    skip = torch.randn(2, 3, 6, 7, 5, generator=gen, dtype=dtype).contiguous(memory_format=layout)
    grad = torch.randn(2, 7, 6, 7, 5, generator=gen, dtype=dtype)
    x.requires_grad_(), skip.requires_grad_()
    ours = norm_crop_concat(norm, x, skip)
    assert isinstance(ours.grad_fn, _EvalNormCropConcat._backward_cls)
    theirs = crop_concat(norm(x), skip)
    assert torch.equal(ours, theirs)
    with torch.no_grad():  # (IO's checkpointed and final forwards: one pass, the same bits)
        assert torch.equal(norm_crop_concat(norm, x, skip), theirs)
    inputs = (x, skip, norm.weight, norm.bias)
    for a, b, tensor in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad), inputs):
        # (float32: BatchNorm's sums in float64 in the C++ pass of channels-last tensors, torch's in float32)
        torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
        assert a.stride() == tensor.stride()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d], ids=["planar", "channels-last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_norm_cropped_cat_is_batch_norms_arithmetic(layout, dtype):
    """IO's BatchNorm written straight into the concatenation gives torch's BatchNorm bit for
    bit, over many channels' terms (with ``1 / sqrt`` for ``rsqrt`` most seeds of 256 channels
    differed in a few of them, and IO against the reference drifted past its tolerance)."""
    from mgr_engine.model import _cropped_cat, _eval_norm_cropped_cat

    for seed in range(4):
        norm = eval_batchnorm(256, seed=seed, dtype=dtype)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 256, 4, 3, 6, generator=gen, dtype=dtype).contiguous(memory_format=layout)
        skip = torch.randn(2, 5, 3, 3, 5, generator=gen, dtype=dtype).contiguous(memory_format=layout)
        with torch.no_grad():  # as its callers run it: a custom function's forward, a recomputation
            expected = _cropped_cat(norm(x), skip)
            got = _eval_norm_cropped_cat(x, skip, norm.weight, norm.bias, norm.running_mean, norm.running_var,
                                         norm.eps)
        assert torch.equal(got, expected) and got.stride() == expected.stride()


def test_eval_norm_crop_concat_gradcheck():
    from mgr_engine.model import _EvalNormCropConcat

    norm = eval_batchnorm(3, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, 4, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(1, 2, 3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda x, skip, weight, bias: _EvalNormCropConcat.apply(x, skip, weight, bias, norm.running_mean,
                                                                 norm.running_var, norm.eps),
        (x, skip, norm.weight, norm.bias))


def test_tf32_switches_are_set_once_for_overlapping_sections_and_restored_after_the_last():
    """The TF32 switches are process-wide: an engine's forward in one thread and IO in another
    (both fp32) overlap; a tf32 engine's section waits for them. The CPU build holds the switches
    as plain flags, so threads on the CPU exercise the bookkeeping CUDA relies on."""
    import threading

    from mgr_engine import model
    from mgr_engine.engine import _TF32_SWITCHES

    backends = torch.backends
    original = (backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32)

    def switches():
        return backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, model.SPLIT_TF32_CONVOLUTIONS

    entered = {name: threading.Event() for name in ("a", "b", "tf32")}
    leave = {name: threading.Event() for name in ("a", "b", "tf32")}
    seen = {}

    def section(name, setting):
        with _TF32_SWITCHES.set_to(setting):
            seen[name] = switches()
            entered[name].set()
            leave[name].wait(10)
            seen[name + " leaving"] = switches()

    threads = {name: threading.Thread(target=section, args=(name, "tf32" if name == "tf32" else "fp32"))
               for name in ("a", "b", "tf32")}
    try:
        backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32 = True, True
        threads["a"].start()
        assert entered["a"].wait(10)
        threads["b"].start()
        assert entered["b"].wait(10)  # the same setting: no wait
        threads["tf32"].start()
        assert not entered["tf32"].wait(0.3)  # the other setting waits for both
        leave["a"].set()
        threads["a"].join(10)
        assert not entered["tf32"].is_set()
        leave["b"].set()
        assert entered["tf32"].wait(10)
        leave["tf32"].set()
        for thread in threads.values():
            thread.join(10)
        assert seen == {"a": (False, False, False), "b": (False, False, False), "a leaving": (False, False, False),
                        "b leaving": (False, False, False), "tf32": (True, True, False),
                        "tf32 leaving": (True, True, False)}
        assert switches() == (True, True, False)  # as they were before the first section
        with _TF32_SWITCHES.set_to("fp32"):
            with _TF32_SWITCHES.set_to("tf32"):  # nested in one thread: the outer setting, no deadlock
                assert switches() == (False, False, False)
        # IO's split convolutions: cuDNN in TF32 for them, cuBLAS left in fp32 (nothing splits its products)
        with _TF32_SWITCHES.set_to("tf32x3"):
            assert switches() == (True, False, True)
        assert switches() == (True, True, False)
    finally:
        for event in leave.values():
            event.set()
        backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32 = original


def test_networks_layout_follows_the_device():
    """Channels-last 3-D on the CPU (faster convolutions there), contiguous on a GPU (cuDNN was
    faster so on an H200): the engine's networks and its inputs to them in that layout."""
    from mgr_engine import ops

    assert ops.network_memory_format("cpu") == torch.channels_last_3d
    assert ops.network_memory_format(torch.device("cuda", 1)) == torch.contiguous_format
    net = random_network((72, 72, 72), narrow=True, seed=1)
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    for network in (engine.network, engine.inference_network):
        assert ops.is_channels_last(network.unets[0].lastConv.weight)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("shape", [(5, 6, 7), (1, 3, 2)])
def test_subpixel_transposed_convolution_equals_the_transposed_one(shape, layout):
    """The sub-pixel form (one convolution into 8 parities, a shuffle, a crop) sums the same
    products as ConvTranspose3d(4, stride 2, padding 1): float64, odd and even sizes, batch 2."""
    from mgr_engine.model import SubpixelConvTranspose3d

    torch.manual_seed(0)
    conv = torch.nn.ConvTranspose3d(3, 5, kernel_size=4, stride=2, padding=1).double()
    x = torch.randn(2, 3, *shape, dtype=torch.float64).contiguous(memory_format=layout)
    with torch.no_grad():
        expected = conv(x)
        got = SubpixelConvTranspose3d(conv.to(memory_format=layout))(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="kernel 4, stride 2, padding 1"):
        SubpixelConvTranspose3d(torch.nn.ConvTranspose3d(3, 5, kernel_size=4, stride=2, padding=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d], ids=["planar", "channels-last"])
def test_io_transposed_convolution_in_subpixel_form(monkeypatch, dtype, layout):
    """With gradients (IO), a transposed convolution's forward runs in sub-pixel form where
    :func:`uses_subpixel_upconvs` says so (CUDA): the output and the gradients of the input, the
    weight and the bias as the transposed convolution's (on a GPU where there is one)."""
    from mgr_engine import model

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # torch's default allows TF32
    torch.manual_seed(0)
    conv = torch.nn.ConvTranspose3d(6, 4, kernel_size=4, stride=2, padding=1)
    conv = conv.to(KERNEL_DEVICE, dtype, memory_format=layout)
    x = torch.randn(2, 6, 5, 7, 6, dtype=dtype, device=KERNEL_DEVICE).contiguous(memory_format=layout)
    x.requires_grad_(True)
    grad = torch.randn(2, 4, 10, 14, 12, dtype=dtype, device=KERNEL_DEVICE)
    results, calls, plain = [], [], model.subpixel_weight
    monkeypatch.setattr(model, "subpixel_weight", lambda weight: calls.append(1) or plain(weight))
    for subpixel in (False, True):
        monkeypatch.setattr(model, "uses_subpixel_upconvs", lambda device: subpixel)
        out = model.low_memory_conv(conv, x)
        results.append((out, *torch.autograd.grad(out, [x, conv.weight, conv.bias], grad)))
    assert len(calls) == 1  # the sub-pixel form ran, once
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for plain_result, subpixel_result in zip(*results):
        torch.testing.assert_close(subpixel_result, plain_result, **tolerance)


def test_network_with_subpixel_upconvs_predicts_the_same_map(monkeypatch):
    """The engine's inference network (BatchNorm folded, channels-last on the CPU, the C++
    decoder) with every transposed convolution in the sub-pixel form, as the engine builds it
    where :func:`uses_subpixel_upconvs` says so (on CUDA): the same map (float32)."""
    from mgr_engine import engine as engine_module
    from mgr_engine.model import SubpixelConvTranspose3d
    from mgr_engine.ops import identity_map

    net = random_network((72, 72, 72), narrow=True, seed=6, displacement_scale=0.5)
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    assert not any(isinstance(conv, SubpixelConvTranspose3d) for conv in engine.inference_network.modules())
    monkeypatch.setattr(engine_module, "uses_subpixel_upconvs", lambda device: True)
    subpixel_engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    upconvs = [conv for unet in subpixel_engine.inference_network.unets for conv in unet.upConvs]
    assert len(upconvs) == 20 and all(isinstance(conv, SubpixelConvTranspose3d) for conv in upconvs)
    moving, fixed = (torch.from_numpy(smooth_volume((72, 72, 72), seed))[None, None] for seed in (1, 2))
    expected = engine.predict_map(moving, fixed)
    got = subpixel_engine.predict_map(moving, fixed)
    voxel = torch.tensor([71.0, 71.0, 71.0]).view(1, 3, 1, 1, 1)
    assert ((got - expected) * voxel).abs().max() < 1e-4
    assert ((expected - identity_map((72, 72, 72))) * voxel).abs().max() > 0.5  # not the identity map
