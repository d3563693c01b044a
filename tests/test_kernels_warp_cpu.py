"""The C++ trilinear warp (kernels/warp_cpu.py) against the PyTorch reference of ops.warp,
and the dispatch that picks it on the CPU.

Skipped where the extension was not built, except under ``MGR_ENGINE_REQUIRE_CPP=1`` (set by
``make test``), where a missing build fails instead of hiding.
"""

import os

import pytest
import torch

from mgr_engine import ops
from mgr_engine.errors import InvalidOptionError
from mgr_engine.kernels import warp_cpu

if not warp_cpu.available():
    if os.environ.get("MGR_ENGINE_REQUIRE_CPP") == "1":
        pytest.fail("mgr_engine._trilinear_cpu was not built (pip install -e . with a C++ compiler)",
                    pytrace=False)
    pytest.skip("the C++ extension was not built", allow_module_level=True)

SHAPES = [  # image grid, map grid: odd, non-cubic, map grid unlike the image's
    ((5, 6, 7), (4, 5, 3)),
    ((9, 4, 6), (9, 4, 6)),
    ((3, 8, 5), (2, 3, 7)),
    ((33, 20, 17), (31, 22, 19)),
]


def random_map(batch, shape, spread, seed=0):
    """A map around the identity that leaves [0, 1] by up to ``spread`` in places."""
    gen = torch.Generator().manual_seed(seed)
    return ops.identity_map(shape) + spread * (torch.rand(batch, 3, *shape, generator=gen) * 2 - 1)


def reference_warp(image, coords, padding):
    with ops.kernel_mode("torch"):
        return ops.warp(image, coords, padding)


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("grid,out", SHAPES)
@pytest.mark.parametrize("batch,channels,map_batch", [(1, 1, 1), (2, 3, 2), (3, 2, 1)])
def test_values_match_grid_sample(padding, grid, out, batch, channels, map_batch):
    image = torch.rand(batch, channels, *grid, generator=torch.Generator().manual_seed(1))
    coords = random_map(map_batch, out, spread=0.3)
    expected = reference_warp(image, coords, padding)
    got = warp_cpu.warp_cpu(image, coords, padding)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    if padding == "zeros":
        assert (expected == 0).any()  # the map leaves the domain: the zero padding was exercised


def test_far_outside_nan_and_grid_corners():
    image = torch.rand(1, 2, 4, 5, 6, generator=torch.Generator().manual_seed(2))
    coords = ops.identity_map((4, 5, 6)).clone()
    coords[0, 0, 0, 0, 0] = 7.0       # far outside: zeros gives 0, border the edge value
    coords[0, 1, 1, 1, 1] = -3.0
    coords[0, 2, 2, 2, 2] = float("nan")  # documented: a non-finite coordinate gives 0
    for padding in ("zeros", "border"):
        got = warp_cpu.warp_cpu(image, coords, padding)
        expected = reference_warp(image, coords, padding)
        assert torch.equal(got[..., 2, 2, 2], torch.zeros(1, 2))
        got[..., 2, 2, 2] = expected[..., 2, 2, 2] = 0
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    identity = warp_cpu.warp_cpu(image, ops.identity_map((4, 5, 6)), "zeros")
    torch.testing.assert_close(identity, image, rtol=0, atol=1e-6)  # voxel centres at i / (n - 1)


def test_non_contiguous_inputs_and_thread_counts_agree():
    image = torch.rand(1, 8, 12, 10, 3, generator=torch.Generator().manual_seed(3)).permute(0, 4, 1, 2, 3)
    coords = random_map(1, (9, 11, 7), spread=0.2).transpose(3, 4).contiguous().transpose(3, 4)
    assert not image.is_contiguous() and not coords.is_contiguous()
    expected = reference_warp(image, coords, "zeros")
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(warp_cpu.warp_cpu(image, coords, "zeros"))
    finally:
        torch.set_num_threads(threads)
    for result in results:
        assert torch.equal(result, results[0])
    torch.testing.assert_close(results[0], expected, rtol=0, atol=2e-6)


def test_auto_mode_takes_cpp_only_where_no_gradient_is_needed(monkeypatch):
    calls = []
    original = warp_cpu.warp_cpu
    monkeypatch.setattr(warp_cpu, "warp_cpu", lambda *args: calls.append(1) or original(*args))
    image = torch.rand(1, 1, 6, 6, 6)
    coords = random_map(1, (5, 5, 5), spread=0.1)
    with ops.kernel_mode("auto"):
        ops.warp(image, coords)
        assert len(calls) == 1
        with torch.no_grad():
            ops.warp(image.requires_grad_(), coords)
        assert len(calls) == 2
        warped = ops.warp(image, coords)  # gradient wanted: PyTorch, differentiable
        assert len(calls) == 2 and warped.grad_fn is not None
        ops.warp(image.detach().double(), coords.double())  # float64: PyTorch
        traced = torch.jit.trace(lambda a, b: ops.warp(a, b), (image.detach(), coords), check_trace=False)
        assert len(calls) == 2 and "grid_sampler" in str(traced.graph)
    with ops.kernel_mode("torch"):
        ops.warp(image.detach(), coords)
    assert len(calls) == 2
    with ops.kernel_mode("triton"):
        assert not ops.use_cpp_warp(image.detach(), coords)


def test_cpp_mode_without_the_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(warp_cpu, "_trilinear_cpu", None)
    with ops.kernel_mode("cpp"), pytest.raises(InvalidOptionError, match="pip install"):
        ops.warp(torch.rand(1, 1, 4, 4, 4), ops.identity_map((4, 4, 4)))
    with ops.kernel_mode("auto"):  # auto falls back quietly
        torch.testing.assert_close(ops.warp(torch.ones(1, 1, 4, 4, 4), ops.identity_map((4, 4, 4))),
                                   torch.ones(1, 1, 4, 4, 4))
