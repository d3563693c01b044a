"""The engine's ops pick the Triton kernels by mode, and the paths built on them agree.

On the CPU through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py); on a GPU
compiled, on CUDA tensors.
"""

import pytest
import torch

from helpers import INTERPRETED, randomize_, require_triton_kernels, smooth_volume
from helpers import KERNEL_DEVICE as DEVICE
from mgr_engine import Engine, NetworkConfig, ops
from mgr_engine.errors import InvalidOptionError
from mgr_engine.losses import gradicon_regularizer, lncc2_loss
from mgr_engine.model import GradICONNetwork, evaluate_map, official_state_dict

require_triton_kernels()


def test_auto_mode_uses_triton_only_on_cuda(monkeypatch):
    with ops.kernel_mode("auto"):
        assert not ops.use_triton(torch.zeros(1))
    with ops.kernel_mode("triton"):
        assert ops.use_triton(torch.zeros(1, device=DEVICE))
    with ops.kernel_mode("torch"):
        assert not ops.use_triton(torch.zeros(1))
    with pytest.raises(InvalidOptionError):
        ops.set_kernel_mode("cuda")
    # forced on a CPU tensor without the interpreter: Triton's "0 active drivers" before
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with ops.kernel_mode("triton"), pytest.raises(InvalidOptionError, match="'triton' runs on CUDA tensors, or on "
                                                                             "the CPU in Triton's interpreter"):
        ops.use_triton(torch.zeros(1))


def test_a_kernel_mode_the_environment_misspells_is_warned_about_and_auto(tmp_path):
    """MGR_ENGINE_KERNELS=CPP ran neither C++ nor Triton kernels, silently (1.4-3x slower)."""
    import os
    import subprocess
    import sys

    script = "from mgr_engine import kernel_modes; print(kernel_modes.current_kernel_mode())"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "MGR_ENGINE_KERNELS": "CPP"}, cwd=tmp_path)
    assert run.stdout.strip() == "auto"
    assert "MGR_ENGINE_KERNELS='CPP' is not a kernel mode (auto, triton, cpp, torch): using 'auto'" in run.stderr


def test_regularizer_and_similarity_agree_across_modes():
    """The GradICON regularizer (compositions, finite differences) and LNCC^2 through both
    implementations, values and gradients, on small fields."""
    shapes = [(4, 5, 4), (7, 6, 8), (8, 8, 8)]
    identity = ops.identity_map((8, 8, 8), dtype=torch.float64, device=DEVICE)
    results = {}
    for mode in ("torch", "triton"):
        fields_ab = [(0.05 * torch.randn(1, 3, *s, generator=torch.Generator().manual_seed(i), dtype=torch.float64))
                     .to(DEVICE).requires_grad_() for i, s in enumerate(shapes)]
        fields_ba = [(0.05 * torch.randn(1, 3, *s, generator=torch.Generator().manual_seed(10 + i), dtype=torch.float64))
                     .to(DEVICE) for i, s in enumerate(shapes)]
        image = torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(20), dtype=torch.float64).to(DEVICE)
        with ops.kernel_mode(mode):
            reg = gradicon_regularizer(lambda x: evaluate_map(fields_ab, x), lambda x: evaluate_map(fields_ba, x),
                                       identity, generator=torch.Generator().manual_seed(1))
            warped = ops.warp(image, evaluate_map(fields_ab, identity))
            sim = lncc2_loss(warped, image)
            total = reg + sim
            grads = torch.autograd.grad(total, fields_ab)
        results[mode] = (reg.detach(), sim.detach(), grads)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-9, atol=1e-11)
    for a, b in zip(results["triton"][2], results["torch"][2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert results["torch"][0] > 0


@pytest.mark.parametrize("similarity,masked", [("lncc2", True), ("lncc", False), ("mind", True)])
def test_instance_optimization_agrees_across_modes(similarity, masked, monkeypatch):
    """Instance optimization end to end (the network's compositions and warps, the GradICON
    regularizer, the similarity, loss masks, Adam) on the Triton kernels and on PyTorch's ops:
    the same losses and map. A network three levels deep on an odd, non-cubic grid, small
    enough for the interpreter."""
    iterations = 2
    if INTERPRETED:  # it runs each program in Python: fewer, larger blocks (any power of two is valid)
        from mgr_engine.kernels import lncc, mind_ssc, warp

        monkeypatch.setattr(warp, "BLOCK", 8192)
        monkeypatch.setattr(lncc, "BLOCK", 8192)
        monkeypatch.setattr(mind_ssc, "BLOCK", 8192)
        iterations = 1  # a step's forward and backward run every kernel; a second step, a minute of CI, none new
    shape = (18, 21, 17)
    config = NetworkConfig(input_shape=shape, down_channels=(2, 4, 8, 8), up_channels=(4, 8, 8))
    network = randomize_(GradICONNetwork(config), seed=4, displacement_scale=0.3)
    engine = Engine(weights=official_state_dict(network), config=config, device=DEVICE)
    moving, fixed = (torch.from_numpy(smooth_volume(shape, seed))[None, None].to(DEVICE) for seed in (1, 2))
    masks = {}
    if masked:
        masks = {"moving_mask": torch.zeros_like(moving), "fixed_mask": torch.zeros_like(fixed)}
        masks["moving_mask"][..., 2:16, 3:20, 1:12] = 1
        masks["fixed_mask"][..., 4:18, 0:15, 5:17] = 1
    results = {}
    for mode in ("torch", "triton"):
        with ops.kernel_mode(mode):
            results[mode] = engine.instance_optimize(moving, fixed, iterations=iterations, similarity=similarity,
                                                     progress=False, generator=torch.Generator().manual_seed(0),
                                                     **masks)
    voxel = torch.tensor(shape, device=DEVICE).view(1, 3, 1, 1, 1) - 1
    (phi_torch, _, losses_torch), (phi_triton, _, losses_triton) = results["torch"], results["triton"]
    with ops.kernel_mode("torch"):
        moved = ((phi_torch - engine.predict_map(moving, fixed)) * voxel).abs().max()
    print(f"IO moved the map by {moved:.3f} voxel; the modes differ by "
          f"{((phi_triton - phi_torch) * voxel).abs().max():.2e} voxel")
    torch.testing.assert_close(torch.tensor(losses_triton), torch.tensor(losses_torch), rtol=1e-5, atol=0)
    # Adam's first steps are nearly sign(gradient) * lr, so rounding that flips the sign of a
    # tiny gradient moves a weight by the whole step: the maps agree to about 1e-4 of what IO
    # moved them (a larger lr spreads them further), a gradient with a wrong sign does not.
    assert ((phi_triton - phi_torch) * voxel).abs().max() < 1e-2 * moved
