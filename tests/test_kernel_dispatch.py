"""The engine's ops pick the Triton kernels by mode, and the paths built on them agree."""

import os

import pytest
import torch

from mgr_engine import ops
from mgr_engine.errors import InvalidOptionError
from mgr_engine.losses import gradicon_regularizer, lncc2_loss
from mgr_engine.model import evaluate_map

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)


def test_auto_mode_uses_triton_only_on_cuda():
    with ops.kernel_mode("auto"):
        assert not ops.use_triton(torch.zeros(1))
    with ops.kernel_mode("triton"):
        assert ops.use_triton(torch.zeros(1))
    with ops.kernel_mode("torch"):
        assert not ops.use_triton(torch.zeros(1))
    with pytest.raises(InvalidOptionError):
        ops.set_kernel_mode("cuda")


def test_regularizer_and_similarity_agree_across_modes():
    """The GradICON regularizer (compositions, finite differences) and LNCC^2 through both
    implementations, values and gradients, on small fields."""
    shapes = [(4, 5, 4), (7, 6, 8), (8, 8, 8)]
    identity = ops.identity_map((8, 8, 8), dtype=torch.float64)
    results = {}
    for mode in ("torch", "triton"):
        fields_ab = [(0.05 * torch.randn(1, 3, *s, generator=torch.Generator().manual_seed(i), dtype=torch.float64)).requires_grad_()
                     for i, s in enumerate(shapes)]
        fields_ba = [(0.05 * torch.randn(1, 3, *s, generator=torch.Generator().manual_seed(10 + i), dtype=torch.float64))
                     for i, s in enumerate(shapes)]
        image = torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
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
