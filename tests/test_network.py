"""The network against the authors' implementation, with every weight randomized."""

import pytest
import torch

from helpers import NARROW, random_network, reference_network, smooth_volume
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
    for a, b in zip(engine.network.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)


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
    net = random_network((72, 72, 72), narrow=True, seed=3, displacement_scale=0.5)
    moving, fixed = pair((72, 72, 72))
    eager = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    compiled = Engine(weights=official_state_dict(net), config=net.config, device="cpu", compile=True)
    difference = ((compiled.predict_map(moving, fixed) - eager.predict_map(moving, fixed)) * voxels((72, 72, 72))).abs().max()
    assert difference < 1e-3


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


def plain_leaky_relu_conv(conv, x):
    return conv(torch.nn.functional.leaky_relu(x))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("grads", ["all", "weights only", "input only"])
def test_leaky_relu_conv_equals_autograd(transposed, layout, grads):
    """The U-Net's ``conv(leaky_relu(x))`` that keeps only ``x`` for backward: values and the
    gradients of x, weight and bias equal autograd's, over odd grids, batch 2, both layers."""
    from mgr_engine.model import _LeakyReluConv, leaky_relu_conv

    torch.manual_seed(3)
    conv = (torch.nn.ConvTranspose3d(5, 3, 4, padding=1, stride=2) if transposed
            else torch.nn.Conv3d(3, 5, 3, padding=1, stride=2)).double()
    conv.requires_grad_(grads != "input only")
    x = torch.randn(2, conv.in_channels, 7, 6, 5, dtype=torch.float64).contiguous(memory_format=layout)
    x.requires_grad_(grads != "weights only")
    inputs = [t for t in (x, conv.weight, conv.bias) if t.requires_grad]
    got, expected = leaky_relu_conv(conv, x), plain_leaky_relu_conv(conv, x)
    assert got.grad_fn is not None and "LeakyReluConv" in type(got.grad_fn).__name__
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(expected)
    for got_grad, expected_grad in zip(torch.autograd.grad(got, inputs, grad_out),
                                       torch.autograd.grad(expected, inputs, grad_out)):
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-10, atol=1e-12)
    if grads == "all":
        torch.autograd.gradcheck(lambda x, weight, bias: _LeakyReluConv.apply(
            x, weight, bias, conv.stride[0], conv.padding[0], transposed), (x, conv.weight, conv.bias))


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd keeps for backward while ``fn`` runs."""
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(saved.values())


def test_unet_keeps_only_the_activations_inputs_for_backward(monkeypatch):
    """With gradients, a U-Net keeps each activation's input and not its output as well: the
    difference is exactly the activations' outputs (1 GiB of an IO step at 175^3)."""
    from mgr_engine import model

    unet = random_network((72, 72, 72), narrow=True, seed=4).unets[3].train()
    moving, fixed = (v.float() for v in pair((40, 36, 34)))
    fused = saved_bytes(lambda: unet(moving, fixed))
    activations = []

    def recording(conv, x):
        activated = torch.nn.functional.leaky_relu(x)
        activations.append(activated.untyped_storage().nbytes())
        return conv(activated)

    monkeypatch.setattr(model, "leaky_relu_conv", recording)
    plain = saved_bytes(lambda: unet(moving, fixed))
    assert len(activations) == 2 * len(unet.downConvs)
    # The first activation's input, the images, needs no gradient: kept in place of its output.
    assert plain - fused == sum(activations[1:]) > 0
