"""ONNX graphs of the GradICON network, written node by node from its weights.

Two kinds (:func:`full_graph`, :func:`stage_graph`):

* **full**: ``(moving, fixed)`` at the network input shape -> ``map`` and ``displacement``
  (``map - identity``), both ``(B, 3, *input_shape)`` in [0, 1] coordinates, as
  :meth:`mgr_engine.GradICONNetwork.forward`. The four U-Nets, the pooling, and every warp and
  composition (``GridSample``, opset 20 or later for 3-D) are in the graph.
* **stage** k: U-Net ``Psi_k`` alone, ``(moving_k, fixed_k)`` at its level's shape ->
  ``displacement`` on that grid, using only :data:`STAGE_OPS` (what TensorRT runs natively).
  An engine runs the U-Nets from these graphs and the warps/compositions itself
  (:func:`mgr_engine.export.runtime.stage_network` does it with :mod:`mgr_engine.ops`).

Every shape is static. BatchNorm is folded into the transposed convolution before it
(:func:`mgr_engine.model.fold_batchnorm`), its remaining per-channel scale applied to the
upsampled path at low resolution (before ``Resize``: 8x fewer multiplies), and the last
convolution absorbs the network's ``/ 10``.

``cpu_rewrites=True`` (the default of the full graph) rewrites the two kinds of node that
ONNX Runtime's CPU provider runs slowly on these shapes, with the same arithmetic (see
benchmarks/RESULTS.md, "ONNX Runtime"):

* each 4^3 stride-2 ``ConvTranspose`` (a GEMM into a column buffer of 64x the input, then
  col2im) becomes its sub-pixel form, one 2^3 ``Conv`` computing the 8 output phases and a
  one-hot grouped 2^3 stride-2 ``ConvTranspose`` interleaving them (:func:`_conv_transpose_phases`);
* the last 3^3 convolution at full resolution (im2col of 27x its input for 3 outputs) becomes
  a 2-D convolution over the volume viewed as rows (:func:`_last_conv_2d`).

Only ``onnx`` and ``numpy`` are needed here (imported when a graph is built); the weights
come from a :class:`~mgr_engine.model.GradICONNetwork`.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from ..errors import OnnxError
from ..model import LEAKY_SLOPE, GradICONNetwork, fold_batchnorm

MIN_OPSET_FULL = 20  # GridSample on 5-D tensors (3-D volumes) is opset 20
MIN_OPSET_STAGE = 13  # Resize with an optional roi input, Slice/Pad with tensor inputs
DEFAULT_OPSET = {"full": 20, "stages": 17}  # 17: the newest opset TensorRT 8.6 parses
STAGE_OPS = frozenset({"Conv", "ConvTranspose", "LeakyRelu", "AveragePool", "Resize", "Add", "Concat", "Slice", "Pad"})
DTYPES = ("float32", "float16")


def _onnx():
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from ..errors import MissingDependencyError

        raise MissingDependencyError(
            "ONNX export needs the 'onnx' package: pip install 'mgr_engine[onnx]' (or pip install onnx onnxruntime)."
        ) from exc
    return onnx


class Builder:
    """Nodes and initializers of one graph; :meth:`op` returns the name of the node's output."""

    def __init__(self, dtype: str = "float32"):
        self.onnx = _onnx()
        self.np_dtype = np.dtype(dtype)
        self.nodes, self.initializers, self.count = [], [], 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, array, hint: str = "const", dtype=None) -> str:
        array = np.ascontiguousarray(np.asarray(array, dtype=dtype))
        name = self.name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def weight(self, tensor, hint: str) -> str:
        """A float initializer in the graph's compute precision, from a torch tensor."""
        return self.const(tensor.detach().cpu().double().numpy().astype(self.np_dtype), hint)

    def ints(self, values, hint: str = "ints") -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint)

    def op(self, op_type: str, inputs, hint: str, **attrs) -> str:
        name = self.name(hint)
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def rename(self, old: str, new: str) -> str:
        """Give the tensor ``old`` the name ``new`` (a graph output's public name)."""
        for node in self.nodes:
            for names in (node.input, node.output):
                for i, value in enumerate(names):
                    if value == old:
                        names[i] = new
        return new


# ------------------------------------------------------------------ the U-Net


def _half(shape):
    return tuple((n + 1) // 2 for n in shape)


def _match_channels(g: Builder, x: str, have: int, want: int, hint: str) -> str:
    """``mgr_engine.model._match_channels``: the first ``want`` channels, or zeros in front."""
    if have > want:
        return g.op("Slice", [x, g.ints([0]), g.ints([want]), g.ints([1])], f"{hint}/channels")
    if have < want:
        pads = [0, want - have, 0, 0, 0] + [0] * 5
        return g.op("Pad", [x, g.ints(pads)], f"{hint}/pad_channels", mode="constant")
    return x


def _conv(g: Builder, x: str, conv, hint: str, *, stride=1, padding=1, scale=1.0, reverse=False) -> str:
    """``conv`` with its weights and bias times ``scale``, its output channels reversed if ``reverse``."""
    w, b = conv.weight, conv.bias
    if scale != 1.0:
        w, b = w.double() * scale, b.double() * scale
    if reverse:
        w, b = w.flip(0), b.flip(0)
    k = list(conv.kernel_size)
    return g.op("Conv", [x, g.weight(w, f"{hint}/w"), g.weight(b, f"{hint}/b")], hint,
                kernel_shape=k, strides=[stride] * 3, pads=[padding] * 6)


def _conv_transpose_native(g: Builder, x: str, conv, hint: str) -> str:
    """4^3 stride-2 padding-1 transposed convolution: (n -> 2n) per axis."""
    return g.op("ConvTranspose", [x, g.weight(conv.weight, f"{hint}/w"), g.weight(conv.bias, f"{hint}/b")], hint,
                kernel_shape=[4, 4, 4], strides=[2, 2, 2], pads=[1] * 6)


# Sub-pixel form of a 4-tap stride-2 padding-1 transposed convolution, per axis:
#   out[2m]     = in[m-1] w[3] + in[m] w[1]      (phase 0: taps 3, 1)
#   out[2m + 1] = in[m]   w[2] + in[m+1] w[0]    (phase 1: taps 2, 0)
# Both phases are 2-tap convolutions of the input. One 2^3 convolution padded by 1 on every
# side computes all 8 phases at once, as 8 * C channels on an (n + 1)^3 grid whose point j
# sees inputs j-1 and j: there phase 0 of out[2j] sits at j and phase 1 of out[2j - 1] at j.
# A grouped 2^3 stride-2 transposed convolution with one-hot kernels interleaves them
# (phase 1 first, then phase 0), and its padding of 1 drops the first and last entries,
# so out[k] comes out at k. Same arithmetic as the transposed convolution; the interleave
# copies (times 1, plus zeros).
_PHASE_TAPS = ((3, 1), (2, 0))


def _conv_transpose_phases(g: Builder, x: str, conv, hint: str) -> str:
    weight = conv.weight.detach().double()  # (in, out, 4, 4, 4)
    c_in, c_out = weight.shape[:2]
    phases = weight.new_zeros(c_out, 8, c_in, 2, 2, 2)  # output channel c * 8 + phase
    interleave = weight.new_zeros(c_out * 8, 1, 2, 2, 2)
    for p in range(8):
        rz, ry, rx = p >> 2, (p >> 1) & 1, p & 1
        taps = weight[:, :, list(_PHASE_TAPS[rz])][:, :, :, list(_PHASE_TAPS[ry])][:, :, :, :, list(_PHASE_TAPS[rx])]
        phases[:, p] = taps.transpose(0, 1)
        interleave[p::8, 0, 1 - rz, 1 - ry, 1 - rx] = 1.0
    y = g.op("Conv", [x, g.weight(phases.reshape(c_out * 8, c_in, 2, 2, 2), f"{hint}/phases/w")], f"{hint}/phases",
             kernel_shape=[2, 2, 2], pads=[1] * 6)
    return g.op("ConvTranspose", [y, g.weight(interleave, f"{hint}/interleave/w"), g.weight(conv.bias, f"{hint}/b")],
                f"{hint}/interleave", kernel_shape=[2, 2, 2], strides=[2, 2, 2], pads=[1] * 6, group=c_out)


def unet_graph(g: Builder, unet, moving: str, fixed: str, channels: int, shape, hint: str, *,
               cpu_rewrites: bool = False, scale_op: str = "Mul", grid_units: bool = False) -> str:
    """Nodes of one BatchNorm-folded :class:`~mgr_engine.model.UNet` on ``moving``/``fixed``
    (``channels`` channels each, spatial ``shape``); returns the displacement's name.

    ``scale_op``: how the folded BatchNorm's scale multiplies the upsampled path: ``"Mul"`` or
    ``"Conv"`` (a depthwise 1^3 convolution: the same products, in the stage op set).
    ``grid_units``: output the displacement reversed (x, y, z) and doubled, GridSample's units.
    ``cpu_rewrites``: see the module docstring.
    """
    x = g.op("Concat", [moving, fixed], f"{hint}/input", axis=1)
    c, shape = 2 * channels, tuple(shape)
    skips = []
    for i, conv in enumerate(unet.downConvs):
        skips.append((x, c, shape))
        y = _conv(g, g.op("LeakyRelu", [x], f"{hint}/down{i}/act", alpha=LEAKY_SLOPE), conv, f"{hint}/down{i}/conv",
                  stride=2, padding=1)
        pooled = g.op("AveragePool", [x], f"{hint}/down{i}/pool", kernel_shape=[2, 2, 2], strides=[2, 2, 2],
                      ceil_mode=1, count_include_pad=0)
        pooled = _match_channels(g, pooled, c, conv.out_channels, f"{hint}/down{i}")
        x = g.op("Add", [y, pooled], f"{hint}/down{i}/add")
        c, shape = conv.out_channels, _half(shape)
    for depth in reversed(range(len(unet.upConvs))):
        conv, scale = unet.upConvs[depth], unet.batchNorms[depth].scale.flatten()
        act = g.op("LeakyRelu", [x], f"{hint}/up{depth}/act", alpha=LEAKY_SLOPE)
        if cpu_rewrites:
            y = _conv_transpose_phases(g, act, conv, f"{hint}/up{depth}/convT")
        else:
            y = _conv_transpose_native(g, act, conv, f"{hint}/up{depth}/convT")
        up = _match_channels(g, x, c, conv.out_channels, f"{hint}/up{depth}")
        if scale_op == "Conv":
            up = g.op("Conv", [up, g.weight(scale.view(-1, 1, 1, 1, 1), f"{hint}/up{depth}/scale")],
                      f"{hint}/up{depth}/scale", kernel_shape=[1, 1, 1], group=conv.out_channels)
        else:
            up = g.op("Mul", [up, g.weight(scale.view(1, -1, 1, 1, 1), f"{hint}/up{depth}/scale")],
                      f"{hint}/up{depth}/scale")
        up = g.op("Resize", [up, "", g.const([1.0, 1.0, 2.0, 2.0, 2.0], f"{hint}/up{depth}/scales", np.float32)],
                  f"{hint}/up{depth}/upsample", mode="linear", coordinate_transformation_mode="half_pixel")
        x = g.op("Add", [y, up], f"{hint}/up{depth}/add")
        skip, c_skip, skip_shape = skips[depth]
        if tuple(2 * n for n in shape) != skip_shape:
            x = g.op("Slice", [x, g.ints([0, 0, 0]), g.ints(skip_shape), g.ints([2, 3, 4])], f"{hint}/up{depth}/crop")
        if depth == 0 and cpu_rewrites:
            return _last_conv_2d(g, x, skip, unet.lastConv, conv.out_channels, skip_shape, f"{hint}/last",
                                 scale=0.2 if grid_units else 0.1, reverse=grid_units)
        x = g.op("Concat", [x, skip], f"{hint}/up{depth}/skip", axis=1)
        c, shape = conv.out_channels + c_skip, skip_shape
    # The network's `/ 10`, folded into the last convolution (and x2 and reversed in grid units).
    return _conv(g, x, unet.lastConv, f"{hint}/last", scale=0.2 if grid_units else 0.1, reverse=grid_units)


def _last_conv_2d(g: Builder, x: str, skip: str, conv, channels: int, shape, hint: str, *, scale: float,
                  reverse: bool) -> str:
    """``conv(concat(x, skip))`` (3^3, padding 1, few outputs, at full resolution) without the
    3-D convolution that ONNX Runtime's CPU provider runs through an im2col buffer 27x the input.

    The ``x`` part runs as one 2-D convolution on x viewed as (C, D*H, W): kernel rows dilated by
    H step through z, columns through x, and each y-offset of the kernel gets its own group of
    output channels (ONNX Runtime runs 2-D convolutions in its blocked NCHWc kernels). The y
    offsets are then applied by shifting those groups along y and adding. The image channels of
    ``skip`` get their own 2-D convolution of the same form (they are another tensor; ONNX
    Runtime fuses the add of both into the second convolution); the bias sits in the
    unshifted group.
    """
    w, b = conv.weight.detach().double() * scale, conv.bias.detach().double() * scale
    if reverse:
        w, b = w.flip(0), b.flip(0)
    out = w.shape[0]
    d, h, wd = shape

    def rows_conv(tensor, weight, name, bias=None):
        """(B, C, D, H, W) -> (B, 3 * out, D*H, W): groups of outputs by kernel y-offset."""
        c = weight.shape[1]
        w2d = weight.permute(3, 0, 1, 2, 4).reshape(3 * out, c, 3, 3)  # ky-group then output; kernel (kz, kx)
        flat = g.op("Reshape", [tensor, g.ints([-1, c, d * h, wd])], f"{hint}/{name}_rows")
        inputs = [flat, g.weight(w2d, f"{hint}/{name}_w")]
        if bias is not None:
            inputs.append(g.weight(torch.cat([torch.zeros_like(bias), bias, torch.zeros_like(bias)]), f"{hint}/b"))
        return g.op("Conv", inputs, f"{hint}/{name}_conv2d", kernel_shape=[3, 3], dilations=[h, 1], pads=[h, 1, h, 1])

    y = g.op("Add", [rows_conv(x, w[:, :channels], "x"), rows_conv(skip, w[:, channels:], "skip", b)], f"{hint}/add")
    y = g.op("Reshape", [y, g.ints([-1, 3 * out, d, h, wd])], f"{hint}/volume")
    y = g.op("Pad", [y, g.ints([0, 0, 0, 1, 0, 0, 0, 0, 1, 0])], f"{hint}/pad_y", mode="constant")
    terms = [g.op("Slice", [y, g.ints([k * out, k, 0]), g.ints([(k + 1) * out, k + h, wd]), g.ints([1, 3, 4])],
                  f"{hint}/shift{k}") for k in range(3)]  # ky = k: output row y reads row y + k - 1
    total = g.op("Add", [terms[0], terms[1]], f"{hint}/sum01")
    return g.op("Add", [total, terms[2]], f"{hint}/sum")


# ------------------------------------------------------------------ warps on maps

# Inside the full graph, maps live in GridSample's form: (B, *grid, 3), channels (x, y, z) =
# the reversed (i, j, k), coordinates in [-1, 1] (``2 c - 1`` for a [0, 1] coordinate c), so
# GridSample takes them as they are; the U-Nets' last convolutions output their fields
# reversed and doubled (exact in floating point), in the same units. A composition is then
# GridSample, a transpose to channels-last and an add, instead of a flip and an affine
# rescaling of every map before every GridSample (as mgr_engine.ops.warp does in PyTorch).


def to_grid_form(coords) -> np.ndarray:
    """A (B, 3, *grid) [0, 1] map (torch tensor) as (B, *grid, 3) (x, y, z) in [-1, 1], float32."""
    return (coords.flip(1).permute(0, 2, 3, 4, 1) * 2.0 - 1.0).contiguous().cpu().numpy()


def _channels_last(g: Builder, x: str, hint: str) -> str:
    return g.op("Transpose", [x], hint, perm=[0, 2, 3, 4, 1])


def _warp(g: Builder, image: str, grid: str, hint: str, padding: str = "border") -> str:
    """``mgr_engine.ops.warp`` with the coordinates already in grid form."""
    return g.op("GridSample", [image, grid], hint, mode="linear", padding_mode=padding, align_corners=1)


def _compose(g: Builder, field: str, grid: str, hint: str) -> str:
    """``mgr_engine.ops.compose_maps`` in grid form: ``grid + field(grid)``, the field's border repeated."""
    return g.op("Add", [grid, _channels_last(g, _warp(g, field, grid, f"{hint}/warp"), f"{hint}/channels_last")],
                f"{hint}/add")


def _compose_at_identity(g: Builder, field: str, identity: str, shape, hint: str, batch: int = 1) -> str:
    """``_compose`` at the identity grid: sampling a field at every point of an identity grid
    (``align_corners=True``) is resizing it, which ONNX Runtime runs multi-threaded (its
    3-D GridSample splits the work by channel only)."""
    sizes = g.ints([batch, 3, *shape])
    resized = g.op("Resize", [field, "", "", sizes], f"{hint}/resize", mode="linear",
                   coordinate_transformation_mode="align_corners")
    return g.op("Add", [identity, _channels_last(g, resized, f"{hint}/channels_last")], f"{hint}/add")


def _evaluate_map(g: Builder, fields, grid: str, hint: str, identity_shape=None, batch: int = 1) -> str:
    """``evaluate_map``; ``identity_shape``: ``grid`` is the identity grid of that shape."""
    for index in reversed(range(len(fields))):
        if identity_shape is not None and index == len(fields) - 1:
            grid = _compose_at_identity(g, fields[index], grid, identity_shape, f"{hint}/d{index + 1}", batch)
        else:
            grid = _compose(g, fields[index], grid, f"{hint}/d{index + 1}")
    return grid


def _from_grid_form(g: Builder, grid: str, hint: str) -> str:
    """(B, *grid, 3) (x, y, z) [-1, 1] -> (B, 3, *grid) (i, j, k), still [-1, 1] units."""
    first = g.op("Transpose", [grid], f"{hint}/channels_first", perm=[0, 4, 1, 2, 3])
    return g.op("Gather", [first, g.ints([2, 1, 0])], f"{hint}/ijk", axis=1)


# ------------------------------------------------------------------ graphs


def _folded_unets(network: GradICONNetwork):
    return [fold_batchnorm(unet) for unet in network.unets]


def _model(g: Builder, nodes_inputs, outputs, name: str, opset: int, doc: str):
    onnx = g.onnx
    graph = onnx.helper.make_graph(g.nodes, name, nodes_inputs, outputs, g.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                   producer_name="mgr_engine", doc_string=doc)
    model.ir_version = min(model.ir_version, _max_ir_version(onnx, opset))
    return model


def _max_ir_version(onnx, opset: int) -> int:
    """The IR version the opset came with (keeps older runtimes able to load the file)."""
    for ir, ops in ((8, 18), (9, 20), (10, 22)):
        if opset <= ops:
            return ir
    return onnx.IR_VERSION


def _elem(onnx, dtype: str):
    return onnx.TensorProto.FLOAT16 if dtype == "float16" else onnx.TensorProto.FLOAT


def full_graph(network: GradICONNetwork, *, opset: int = DEFAULT_OPSET["full"], dtype: str = "float32",
               batch: int = 1, cpu_rewrites: bool = True):
    """The whole network as one ONNX model (see the module docstring).

    ``dtype="float16"``: the U-Nets compute in float16 (weights and activations); images,
    maps, warps and the model's inputs and outputs stay float32 (maps in float16 would be
    off by up to ~0.04 voxel at 175^3 from their precision alone).
    """
    check_opset("full", opset)
    g = Builder(dtype)
    onnx = g.onnx
    full, half, quarter = network.config.level_shapes()
    f32 = onnx.TensorProto.FLOAT
    inputs = [onnx.helper.make_tensor_value_info(n, f32, [batch, 1, *full]) for n in ("moving", "fixed")]
    grid_full = g.const(to_grid_form(network.identity_full), "identity_full")
    grid_half = g.const(to_grid_form(network.identity_half), "identity_half")
    if batch > 1:  # GridSample wants one grid per image; Add broadcasts the others
        grid_full = g.op("Expand", [grid_full, g.ints([batch, *full, 3])], "identity_full/batch")
        grid_half = g.op("Expand", [grid_half, g.ints([batch, *half, 3])], "identity_half/batch")
    unets = _folded_unets(network)

    def pool(x, hint):
        return g.op("AveragePool", [x], hint, kernel_shape=[2, 2, 2], strides=[2, 2, 2], ceil_mode=1,
                    count_include_pad=0)

    def field(index, moving, fixed, shape):
        """Displacement of U-Net ``index`` in grid units: channels (x, y, z), doubled."""
        hint = f"psi{index + 1}"
        if dtype == "float16":
            moving = g.op("Cast", [moving], f"{hint}/moving_fp16", to=onnx.TensorProto.FLOAT16)
            fixed = g.op("Cast", [fixed], f"{hint}/fixed_fp16", to=onnx.TensorProto.FLOAT16)
        out = unet_graph(g, unets[index], moving, fixed, 1, shape, hint, cpu_rewrites=cpu_rewrites,
                         grid_units=True)
        if dtype == "float16":
            out = g.op("Cast", [out], f"{hint}/fp32", to=f32)
        return out

    moving_half, fixed_half = pool("moving", "moving_half"), pool("fixed", "fixed_half")
    d1 = field(0, pool(moving_half, "moving_quarter"), pool(fixed_half, "fixed_quarter"), quarter)
    half_map = _compose_at_identity(g, d1, grid_half, half, "half_map", batch)
    d2 = field(1, _warp(g, moving_half, half_map, "moving_half_warped"), fixed_half, half)
    partial_map = _evaluate_map(g, [d1, d2], grid_full, "partial_map", identity_shape=full, batch=batch)
    d3 = field(2, _warp(g, "moving", partial_map, "moving_warped3"), "fixed", full)
    d3_last = _channels_last(g, d3, "psi3/channels_last")
    coarse_map = _evaluate_map(g, [d1, d2], g.op("Add", [grid_full, d3_last], "coarse_map/start"), "coarse_map")
    d4 = field(3, _warp(g, "moving", coarse_map, "moving_warped4"), "fixed", full)
    start = g.op("Add", [grid_full, _channels_last(g, d4, "psi4/channels_last")], "map/start")
    phi = _evaluate_map(g, [d1, d2, d3], start, "map")
    # back to the engine's form: map = (grid + 1) / 2, displacement = (grid - identity) / 2
    half_const = g.const(np.float32(0.5), "half")
    plus_one = g.op("Add", [_from_grid_form(g, phi, "map"), g.const(np.float32(1.0), "one")], "map/plus_one")
    g.rename(g.op("Mul", [plus_one, half_const], "map/scale"), "map")
    moved = _from_grid_form(g, g.op("Sub", [phi, grid_full], "displacement/grid"), "displacement")
    g.rename(g.op("Mul", [moved, half_const], "displacement/scale"), "displacement")
    outputs = [onnx.helper.make_tensor_value_info(n, f32, [batch, 3, *full]) for n in ("map", "displacement")]
    doc = (f"mgr_engine GradICON network, full graph: (moving, fixed) {list(full)} -> map, displacement "
           f"in [0,1] coordinates; {dtype} U-Nets")
    return _model(g, inputs, outputs, "gradicon_full", opset, doc)


def stage_graph(network: GradICONNetwork, index: int, *, opset: int = DEFAULT_OPSET["stages"],
                dtype: str = "float32", batch: int = 1):
    """U-Net ``Psi_{index + 1}`` alone: (moving, fixed) on its level's grid -> displacement.

    Uses only :data:`STAGE_OPS`. ``dtype="float16"``: inputs, weights and output in float16
    (no Cast nodes, which are not in the stage op set).
    """
    check_opset("stages", opset)
    g = Builder(dtype)
    onnx = g.onnx
    full, half, quarter = network.config.level_shapes()
    shape = (quarter, half, full, full)[index]
    elem = _elem(onnx, dtype)
    inputs = [onnx.helper.make_tensor_value_info(n, elem, [batch, 1, *shape]) for n in ("moving", "fixed")]
    unet = fold_batchnorm(network.unets[index])
    out = unet_graph(g, unet, "moving", "fixed", 1, shape, f"psi{index + 1}", scale_op="Conv")
    g.rename(out, "displacement")
    outputs = [onnx.helper.make_tensor_value_info("displacement", elem, [batch, 3, *shape])]
    doc = (f"mgr_engine GradICON network, U-Net Psi{index + 1} alone: (moving, fixed) {list(shape)} -> "
           f"displacement in [0,1] coordinates of that grid; {dtype}")
    return _model(g, inputs, outputs, f"gradicon_psi{index + 1}", opset, doc)


def check_opset(kind: str, opset) -> int:
    """``opset`` as an int; :class:`OnnxError` when it cannot express the ``kind`` graph or
    the installed ``onnx`` does not know it."""
    onnx = _onnx()
    minimum = MIN_OPSET_FULL if kind == "full" else MIN_OPSET_STAGE
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, numbers.Integral) or isinstance(opset, bool):  # int(20.5) was a silent 20
        raise OnnxError(f"opset must be an integer, got {opset!r}")
    value = int(opset)
    if value < minimum:
        reason = ("the full graph warps 3-D volumes with GridSample, which takes 5-D tensors only from opset 20"
                  if kind == "full" else "the stage graphs need Resize with an optional roi and Slice/Pad with tensor "
                                         "inputs (opset 13)")
        raise OnnxError(f"opset {value} cannot express the {kind} graph: {reason}. Use opset {minimum} or later"
                          + (" (or kind='stages', which needs no GridSample, from opset 13)." if kind == "full" else "."))
    if value > newest:
        raise OnnxError(f"opset {value} is newer than the installed onnx {onnx.__version__} knows ({newest}); "
                          f"use opset {minimum}..{newest} or upgrade onnx.")
    return value


def ops_used(model) -> list:
    """Sorted operator types of a model's graph."""
    return sorted({node.op_type for node in model.graph.node})
