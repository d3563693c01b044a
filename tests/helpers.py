"""Shared test helpers: randomized weights, the reference network, synthetic images."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mgr_engine import ops
from mgr_engine.model import (GradICONNetwork, NetworkConfig, official_state_dict, randomize_weights, round_to_tf32,
                               tf32x3)

# The Triton kernels' tests run compiled on a GPU, else in Triton's interpreter (conftest.py
# sets TRITON_INTERPRET=1 where there is no GPU).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def cuda_sync_debug(mode: str):
    """torch's check for host-device synchronizations in ``mode`` (``"warn"`` or ``"error"``)
    within the block, back to ``"default"`` after it."""
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def truncate_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` (float32) with its mantissa cut to TF32's 10 bits (:func:`round_to_tf32` rounds)."""
    return (t.view(torch.int32) & -0x2000).view(torch.float32)


def tensor_core_tf32x3(product, a, b, **options):
    """:func:`mgr_engine.model.tf32x3` (as imported here, before a test patches it) with each of
    its three products' operands rounded to TF32, as a tensor core rounds them: on the CPU,
    whose float32 products of such operands are exact, a stand-in for cuDNN's TF32."""
    return tf32x3(lambda p, q: product(round_to_tf32(p), round_to_tf32(q)), a, b, **options)


def recorded_io_precisions(monkeypatch, owner) -> list:
    """The ``precision`` of each ``instance_optimize`` call on ``owner`` (the ``Engine`` class, or
    one engine), appended to the list returned; the calls run as they would."""
    asked = []
    original = owner.instance_optimize

    def recording(*args, precision, **kwargs):
        asked.append(precision)
        return original(*args, precision=precision, **kwargs)

    monkeypatch.setattr(owner, "instance_optimize", recording)
    return asked


def require_triton_kernels():
    """Skip the calling test module unless its Triton kernels can run (compiled on CUDA, or interpreted)."""
    pytest.importorskip("triton")
    if KERNEL_DEVICE == "cpu" and not INTERPRETED:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)


NARROW = dict(down_channels=(2, 4, 8, 8, 16, 16), up_channels=(4, 8, 8, 16, 16))


def randomize_(network: torch.nn.Module, seed: int = 0, displacement_scale: float = 1.0) -> torch.nn.Module:
    """Every parameter and BatchNorm statistic random (see mgr_engine.model.randomize_weights):
    the default init would make the network output the identity and comparisons pass trivially."""
    return randomize_weights(network, seed, displacement_scale)


def eval_batchnorm(channels: int, seed: int, dtype=torch.float64, device="cpu") -> torch.nn.BatchNorm3d:
    """A BatchNorm3d in eval mode (as IO runs the U-Nets'), its weight, bias and running
    statistics random."""
    return randomize_(torch.nn.BatchNorm3d(channels), seed).eval().to(device, dtype)


def random_network(shape=(72, 72, 72), narrow=False, seed=0, displacement_scale=1.0) -> GradICONNetwork:
    config = NetworkConfig(input_shape=tuple(shape), **(NARROW if narrow else {}))
    return randomize_(GradICONNetwork(config), seed, displacement_scale).eval()


def benchmark_engine(shape, device="cpu", **engine_options):
    """The benchmarks' engine and pair: randomized weights of the official architecture (seed 1,
    fields scaled by 0.3) and two smooth volumes (seeds 1 and 2), (1, 1, *shape), on ``device``.
    Returns ``(engine, moving, fixed)``; ``engine_options`` go to :class:`mgr_engine.Engine`."""
    from mgr_engine import Engine

    net = random_network(shape, seed=1, displacement_scale=0.3)
    engine = Engine(weights=official_state_dict(net), config=net.config, device=device, **engine_options)
    moving, fixed = (torch.from_numpy(smooth_volume(shape, seed))[None, None].to(device) for seed in (1, 2))
    return engine, moving, fixed


def reference_network(network: GradICONNetwork, loss_fn=None, lmbda=1.5, loss_function_masking=False):
    """The authors' GradientICONSparse (icon_registration parts) with ``network``'s weights."""
    import icon_registration as icon
    from icon_registration import networks

    config = network.config
    channels = [list(config.down_channels), list(config.up_channels)]

    def unet():
        return icon.FunctionFromVectorField(networks.UNet2(len(config.up_channels), channels, 3))

    inner = unet()
    for _ in range(2):
        inner = icon.TwoStepRegistration(icon.DownsampleRegistration(inner, dimension=3), unet())
    inner = icon.TwoStepRegistration(inner, unet())
    if loss_fn is None:
        loss_fn = icon.LNCC(sigma=5)
    from unigradicon import GradientICONSparse  # noqa: imported lazily: unigradicon imports itk

    ref = GradientICONSparse(inner, loss_fn, lmbda=lmbda, loss_function_masking=loss_function_masking)
    ref.assign_identity_map([1, 1, *config.input_shape])
    ref.regis_net.load_state_dict(official_state_dict(network))
    return ref.eval()


def import_reference():
    """``reference_network``, importing ``unigradicon`` first. It imports itk at module level
    but ``GradientICONSparse`` never uses it: without itk (the GPU runner), a stub module lets it
    import. For benchmarks only: tests skip where the reference does not import."""
    try:
        import itk  # noqa: F401
    except ImportError:
        stub = types.ModuleType("itk")
        stub.Image = object
        sys.modules["itk"] = stub
    import unigradicon  # noqa: F401  (here, so that a missing dependency shows at once)

    return reference_network


def _saved_tensors(node):
    """The tensors an autograd node keeps: a custom Function's ``saved_tensors``, or the
    ``_saved_*`` attributes of a built-in node."""
    if hasattr(node, "saved_tensors"):  # None for an absent optional input (the LNCC kernel's mask)
        return [tensor for tensor in node.saved_tensors if tensor is not None]
    tensors = []
    for name in dir(node):
        if name.startswith("_saved_"):
            value = getattr(node, name, None)
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif isinstance(value, (list, tuple)):
                tensors.extend(v for v in value if isinstance(v, torch.Tensor))
    return tensors


def kept_for_backward(output: torch.Tensor, ignore=(), unreadable=()):
    """What autograd keeps for ``output``'s backward pass, found by walking its graph: every
    tensor a node saved, each storage counted once (for the first node found that holds it),
    but for the storages of the tensors in ``ignore`` (say, the weights, alive anyway). A node
    whose saved tensors raise one of the exception types ``unreadable`` when read (a node inside
    an activation-checkpointed region, whose reading would recompute the region, made to raise
    instead) keeps nothing. Returns ``(total bytes, {(node type, tensor shape): [count, bytes]})``."""
    seen_storages, seen_nodes = {t.untyped_storage().data_ptr() for t in ignore}, set()
    by_node_and_shape = {}
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        kind = type(node).__name__.removesuffix("Backward")
        try:
            saved = _saved_tensors(node)
        except unreadable:
            saved = []
        for tensor in saved:
            storage = tensor.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen_storages:
                continue
            seen_storages.add(storage.data_ptr())
            entry = by_node_and_shape.setdefault((kind, tuple(tensor.shape)), [0, 0])
            entry[0] += 1
            entry[1] += storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(nbytes for _, nbytes in by_node_and_shape.values()), by_node_and_shape


def smooth_volume(shape, seed=0, blobs=6) -> np.ndarray:
    """A smooth random volume of Gaussian blobs (float32, values roughly 0..1)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    out = np.zeros(shape, np.float64)
    for _ in range(blobs):
        centre = rng.uniform(0.2, 0.8, 3)
        width = rng.uniform(0.08, 0.25)
        out += rng.uniform(0.3, 1.0) * np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / (2 * width**2))
    return out.astype(np.float32)


def rotation(a, b, c):
    """The rotation matrix Rz(c) Ry(b) Rx(a) (radians): an oblique image direction."""
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_image(array, spacing, origin, angles):
    """An ``itk.Image`` of ``array`` (z, y, x) with ``spacing`` and ``origin`` (x, y, z, mm) and
    the direction :func:`rotation` of ``angles``."""
    import itk

    image = itk.image_from_array(np.ascontiguousarray(array))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(itk.matrix_from_array(rotation(*angles)))
    return image


# ------------------------------------------- registrations and transforms of the engine's form (test_resample, test_points)


def random_map(shape, scale, seed):
    """A smooth map that moves points by up to about ``scale`` of the grid, some out of it."""
    g = torch.Generator().manual_seed(seed)
    field = torch.nn.functional.interpolate(torch.randn(1, 3, 4, 4, 4, generator=g, dtype=torch.float64),
                                            size=shape, mode="trilinear")
    return (ops.identity_map(shape, dtype=torch.float64) + scale * field).float()[0]


def random_affine(seed, offset_scale=2.0):
    rng = np.random.default_rng(seed)
    return np.concatenate([np.eye(3) * 0.8 + 0.15 * rng.standard_normal((3, 3)),
                           offset_scale * rng.standard_normal((3, 1))], axis=1)


def oblique_registration():
    """A result of a random map on a (16, 19, 14) network grid between oblique, anisotropic
    images, the moving one partly outside the fixed one's field of view."""
    from mgr_engine.engine import RegistrationResult

    fixed = oblique_image(smooth_volume((20, 24, 18), 1) * 900, (1.2, 1.0, 0.9), (-10.0, -12.0, -8.0), (0.1, 0.0, 0.2))
    moving = oblique_image(smooth_volume((22, 19, 25), 2) * 700 + 50, (1.1, 1.05, 0.95), (-6.0, -15.0, -2.0),
                           (0.15, -0.05, -0.1))
    return RegistrationResult(fixed=fixed, moving=moving, phi_ab=random_map((16, 19, 14), 0.06, seed=12)[None])


def oblique_field_transform(itk, shape, scale, seed):
    """An ITK DisplacementFieldTransform on an oblique, anisotropic grid away from the origin: a
    smooth random displacement of up to about ``scale`` mm."""
    image = itk.Image[itk.Vector[itk.D, 3], 3].New()
    image.SetRegions([int(n) for n in reversed(shape)])
    image.Allocate()
    image.SetSpacing((2.5, 3.0, 2.2))
    image.SetOrigin((-12.0, -16.0, -10.0))  # over part of the fixed image of `registration`
    image.SetDirection(itk.matrix_from_array(rotation(-0.2, 0.1, 0.3)))
    g = torch.Generator().manual_seed(seed)
    field = torch.nn.functional.interpolate(torch.randn(1, 3, 3, 3, 3, generator=g, dtype=torch.float64), size=shape,
                                            mode="trilinear")
    itk.array_view_from_image(image)[...] = (scale * field[0]).permute(1, 2, 3, 0).numpy()
    transform = itk.DisplacementFieldTransform[itk.D, 3].New()
    transform.SetDisplacementField(image)
    return transform


def composite(itk, *applied_in_order):
    transform = itk.CompositeTransform[itk.D, 3].New()
    for part in reversed(applied_in_order):  # a composite applies its last-added first
        transform.AddTransform(part)
    return transform


def affine_transform(itk, seed):
    transform = itk.AffineTransform[itk.D, 3].New()
    affine = random_affine(seed, offset_scale=3.0)
    transform.SetMatrix(itk.matrix_from_array(np.eye(3) + 0.3 * (affine[:, :3] - np.eye(3) * 0.8)))
    transform.SetTranslation(affine[:, 3].tolist())
    return transform


def read_back(transform, path):
    from mgr_engine import itk_io

    itk_io.write_transform(transform, path)
    return itk_io.read_transform(path)


def vector_bytes_fixture(kernel):
    """A fixture running a test in each vector width (64, 32, 16 bytes) the C++ ``kernel`` (a
    module of mgr_engine.kernels with ``vector_bytes(cap)``) can run on this CPU, each body on
    one CPU; the others skip."""
    @pytest.fixture(params=[64, 32, 16], ids=lambda n: f"{n}-byte-vectors")
    def vector_bytes(request):
        try:
            if kernel.vector_bytes(request.param) != request.param:
                pytest.skip(f"this CPU has no {request.param}-byte vectors")
            yield request.param
        finally:
            kernel.vector_bytes(0)

    return vector_bytes


def with_and_without_corner_pairs(extension, compute):
    """``(compute(), compute())``: first as the C++ ``extension`` (``mgr_engine._trilinear_cpu`` or
    ``_resample_cpu``) runs on this CPU, then with its ``corner_pairs`` switch off (its AVX-512 pair
    and vector loops replaced by the loops they replace); the switch is back on afterwards, even
    where ``compute`` fails."""
    try:
        first = compute()
        assert not extension.corner_pairs(0)
        return first, compute()
    finally:
        extension.corner_pairs(1)


def require_cpp_extension(kernel=None) -> None:
    """At a test module's top: skip it where the C++ extension of ``kernel`` (a module of
    mgr_engine.kernels with ``available()``; default the warp's) was not built, or fail under
    ``MGR_ENGINE_REQUIRE_CPP=1`` (set by ``make test``), where a missing build must not hide."""
    from mgr_engine.kernels import warp_cpu

    kernel = kernel or warp_cpu
    if kernel.available():
        return
    if os.environ.get("MGR_ENGINE_REQUIRE_CPP") == "1":
        pytest.fail(f"the C++ extension of {kernel.__name__} was not built (pip install -e . with a C++ compiler)",
                    pytrace=False)
    pytest.skip("the C++ extension was not built", allow_module_level=True)


# The columns of torch.profiler's memory timeline after its leading zero
# (torch/profiler/_memory_profiler.py, _CATEGORY_TO_INDEX; None is "unknown").
TIMELINE_CATEGORIES = ("parameter", "optimizer state", "input", "temporary", "activation", "gradient",
                       "autograd detail", "unknown")


def peak_memory(call, device: str):
    """``(peak bytes, {category: bytes at the peak})`` of the tensors alive during ``call()``
    on ``device``, tensors made before it included, from torch.profiler's memory timeline."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=True,
                                with_stack=True) as profiler:
        call()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "timeline.json"
        with warnings.catch_warnings():  # deprecated for CUDA memory snapshots, which the CPU lacks
            warnings.simplefilter("ignore", FutureWarning)
            profiler.export_memory_timeline(str(path), str(torch.device(device, 0) if device == "cuda" else device))
        _, sizes = json.loads(path.read_text())
    at_peak = max(sizes, key=sum)
    return sum(at_peak), dict(zip(TIMELINE_CATEGORIES, at_peak[1:]))


# The MIND-SSC kernels' tests (C++ and Triton): tolerance relative to the largest reference value
MIND_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}


def assert_mind_close(got, expected, dtype):
    """``got`` within :data:`MIND_TOLERANCE` of ``expected``, relative to its largest value."""
    torch.testing.assert_close(got, expected, rtol=0,
                               atol=MIND_TOLERANCE[dtype] * float(expected.detach().abs().max()))


def descriptors_and_gradients(op, reference, image, seed):
    """``((op(image), reference(image)), (their gradients to image))`` for one random output
    gradient (a CPU generator seeded with ``seed``): what the MIND-SSC kernels' tests compare.
    ``image`` requires its gradient."""
    got, expected = op(image), reference(image)
    grad_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed), dtype=got.dtype).to(got.device)
    gradients = (torch.autograd.grad(got, image, grad_out)[0], torch.autograd.grad(expected, image, grad_out)[0])
    return (got, expected), gradients


def image_with_flat_region(batch, shape, dtype, seed, device="cpu"):
    """A MIND-SSC test image: random values with a constant block, where the 12 patch means tie at
    0 and the variance falls below its clamp's lower bound. (Which of tied minima takes the
    gradient is not seen there, where the pairs' differences are 0: see
    :func:`image_constant_along_z`.)"""
    image = torch.rand(batch, 1, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    image[..., : max(shape[0] // 2, 1), :, : max(shape[2] // 2, 1)] = 0.25
    return image.to(device)


def image_constant_along_z(shape, dtype, seed, device="cpu"):
    """A MIND-SSC test image with exact ties of nonzero patch means: random in (y, x), the same
    in every z-slice. A z-neighbour then equals the centre, so the pairs (+z, +y) and (-z, +y)
    (and so on for -y, +x, -x) have the same differences bit for bit in any implementation, and
    where one of them is the minimum, which of the tied channels takes the gradient (the first,
    as ``torch.min``) shows in the image gradient: their shifts differ along z. (Near ties, as in
    an image symmetric in two axes, are decided by rounding, differently in each implementation.)"""
    plane = torch.rand(1, 1, 1, *shape[1:], generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return plane.expand(1, 1, *shape).contiguous().to(device)
