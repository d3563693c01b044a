"""The C++ MIND-SSC descriptor and loss (kernels/mind_ssc_cpu.py), values and gradients, against
the PyTorch path of mgr_engine.losses, and the dispatch that picks them for IO's MIND-SSC.

Skipped where the extension was not built, except under ``MGR_ENGINE_REQUIRE_CPP=1`` (set by
``make test``), where a missing build fails instead of hiding.
"""

import pytest
import torch

from helpers import (assert_mind_close, descriptors_and_gradients, image_constant_along_z, image_with_flat_region,
                     require_cpp_extension, smooth_volume)
from helpers import MIND_TOLERANCE as TOLERANCE
from mgr_engine import losses, ops
from mgr_engine.kernels import mind_ssc_cpu

require_cpp_extension(mind_ssc_cpu)

# Odd and non-cubic grids; axes shorter than the dilation (2) and the patch radius (2), a single
# voxel, where replicate padding reads the edge voxel for most offsets; one longer than a vector's lanes.
SHAPES = [(7, 9, 11), (1, 6, 5), (2, 3, 37), (12, 1, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 2])
def test_descriptor_values_and_gradients_match_pytorch(dtype, shape, batch):
    image = image_with_flat_region(batch, shape, dtype, seed=0).requires_grad_()
    assert mind_ssc_cpu.supports(image)
    pairs = descriptors_and_gradients(mind_ssc_cpu.mind_ssc, mind_ssc_cpu.reference, image, seed=1)
    (got, expected), (got_grad, expected_grad) = pairs
    assert got.shape == expected.shape == (batch, 12, *shape) and got.is_contiguous()
    assert_mind_close(got, expected, dtype)
    assert float(expected_grad.abs().max()) > 0
    assert_mind_close(got_grad, expected_grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tied_minima_give_the_gradient_to_the_first(dtype):
    """Exact ties of nonzero patch means (:func:`helpers.image_constant_along_z`): the gradient
    through the minimum goes to the first of the tied channels, as in the PyTorch path."""
    image = image_constant_along_z((6, 9, 8), dtype, seed=6).requires_grad_()
    pairs = descriptors_and_gradients(mind_ssc_cpu.mind_ssc, mind_ssc_cpu.reference, image, seed=7)
    (got, expected), (got_grad, expected_grad) = pairs
    assert_mind_close(got, expected, dtype)
    assert_mind_close(got_grad, expected_grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_loss_and_gradient_match_pytorch(dtype, masked, batch):
    """mind_loss in C++ (descriptor, difference, square and mean in one op) against kernel mode
    "torch"; the mask of one sample, or of each, counts only its voxels."""
    shape = (9, 8, 10)
    image = image_with_flat_region(batch, shape, dtype, seed=2)
    target = torch.rand(batch, 1, *shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    mask = None
    if masked:
        mask = torch.rand(batch if batch == 1 else 1, 1, *shape, generator=torch.Generator().manual_seed(4)) > 0.4

    def loss_and_gradient():
        moving = image.clone().requires_grad_()
        loss = losses.mind_loss(moving, target, mask)
        return loss, torch.autograd.grad(loss, moving)[0]

    with ops.kernel_mode("auto"):
        got = loss_and_gradient()
    with ops.kernel_mode("torch"):
        expected = loss_and_gradient()
    assert got[0].dtype == expected[0].dtype == dtype
    assert abs(got[0].item() - expected[0].item()) <= TOLERANCE[dtype] * expected[0].item()
    assert float(expected[1].abs().max()) > 0
    assert_mind_close(got[1], expected[1], dtype)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(5)
    image = torch.rand(2, 1, 5, 6, 4, generator=gen, dtype=torch.float64).requires_grad_()
    torch.autograd.gradcheck(lambda x: mind_ssc_cpu.mind_ssc(x), (image,))
    target_desc = mind_ssc_cpu.reference(torch.rand(1, 1, 5, 6, 4, generator=gen, dtype=torch.float64))
    mask = torch.rand(2, 1, 5, 6, 4, generator=gen) > 0.5
    torch.autograd.gradcheck(lambda x: mind_ssc_cpu.mind_distance(x, target_desc, mask), (image,))


def test_thread_counts_give_the_same_bits():
    """Each voxel's descriptor and gradient are summed by one thread in a fixed order."""
    image = image_with_flat_region(1, (13, 14, 15), torch.float32, seed=6).requires_grad_()
    target_desc = mind_ssc_cpu.reference(torch.rand(1, 1, 13, 14, 15, generator=torch.Generator().manual_seed(7)))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 40):  # 40 threads for 13 planes: some get none
            torch.set_num_threads(n)
            loss = mind_ssc_cpu.mind_distance(image, target_desc)
            results.append((loss.detach(), torch.autograd.grad(loss, image)[0]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1]) for loss, grad in results)


def test_declines_what_it_does_not_compute():
    image = torch.rand(1, 1, 5, 5, 5)
    target_desc = mind_ssc_cpu.reference(image)
    assert mind_ssc_cpu.supports(image) and losses.fused_distance_applies(image, target_desc, None)
    assert not mind_ssc_cpu.supports(image.half())
    assert not mind_ssc_cpu.supports(image[0])  # 4-D
    assert not mind_ssc_cpu.supports(torch.rand(1, 2, 5, 5, 5))  # 2 channels
    fits = losses.fused_distance_applies
    assert not fits(image, target_desc.double(), None)
    assert not fits(image, target_desc[:, :6], None)
    assert not fits(image, target_desc.requires_grad_(), None)  # its gradient wanted
    assert not fits(image, target_desc.detach(), torch.ones(1, 1, 5, 5, 4))
    assert not fits(image.expand(2, 1, 5, 5, 5), target_desc.detach().expand(3, 12, 5, 5, 5), None)


def test_io_similarity_takes_it_on_the_cpu(monkeypatch):
    """In auto mode IO's MIND-SSC (the target's descriptor kept across steps) runs the C++ ops:
    the target's descriptor once, then one fused loss a call; kernel mode "torch" runs none; a
    target that wants its gradient gets it through the descriptor op."""
    calls = []
    for name in ("MindSSCCPU", "MindDistanceCPU"):
        function = getattr(mind_ssc_cpu, name)
        monkeypatch.setattr(function, "apply", lambda *args, _name=name, _apply=function.apply:
                            calls.append(_name) or _apply(*args))
    shape = (12, 10, 14)
    image = torch.from_numpy(smooth_volume(shape, 1))[None, None].double().requires_grad_()
    target = torch.from_numpy(smooth_volume(shape, 2))[None, None].double()
    similarity = losses.with_constant_targets(losses.similarity_by_name("mind"))
    with ops.kernel_mode("auto"):
        for _ in range(2):
            similarity(image, target).backward()
    assert calls == ["MindSSCCPU", "MindDistanceCPU", "MindDistanceCPU"]
    with ops.kernel_mode("torch"):
        similarity(image, target).backward()
    assert len(calls) == 3
    with ops.kernel_mode("auto"):
        target_grad = target.clone().requires_grad_()
        losses.mind_loss(image, target_grad).backward()
    assert calls[3:] == ["MindSSCCPU", "MindSSCCPU"] and float(target_grad.grad.abs().max()) > 0
