"""ONNX export and the ONNX Runtime backend (installed as ``mgr_engine.export``).

    mgr_engine.export_onnx("gradicon.onnx", weights="Step_2_final.trch")                   # full graph
    mgr_engine.export_onnx("gradicon_stages", weights="Step_2_final.trch", kind="stages")  # 4 U-Nets
    mgr_engine.register(fixed, moving, backend="onnxruntime", onnx_model="gradicon.onnx")

:mod:`.graph` writes the graphs node by node, :mod:`.runtime` runs them. ``onnx`` and
``onnxruntime`` are the optional extra ``mgr_engine[onnx]``, imported only when used.
"""

from __future__ import annotations

import numbers
import os
import tempfile
from pathlib import Path

from ..errors import OnnxError, OutputWriteError, tilde_hint
from ..itk_io import staged_outputs
from .graph import DEFAULT_OPSET, DTYPES, STAGE_OPS, check_opset, full_graph, ops_used, stage_graph
from .runtime import STAGE_FILES, load_session, onnx_predictor, stage_network

KINDS = ("full", "stages")

__all__ = ["DEFAULT_OPSET", "KINDS", "STAGE_FILES", "STAGE_OPS", "export_onnx", "full_graph", "load_session",
           "onnx_predictor", "ops_used", "stage_graph", "stage_network"]


def export_onnx(path, model: str = "multigradicon", weights=None, kind: str = "full", *, opset: int | None = None,
                dtype: str = "float32", config=None, batch: int = 1, cpu_rewrites: bool | None = None) -> list:
    """Export the network (BatchNorm folded, static shapes) as ONNX; returns the written paths.

    Args:
        path: ``kind="full"``: the ``.onnx`` file to write. ``kind="stages"``: a directory
            (created if its parent exists) that receives ``psi1.onnx`` .. ``psi4.onnx``.
        model, weights, config: as for :class:`mgr_engine.Engine` (``weights``: checkpoint path
            or state dict; default: the search path of :func:`mgr_engine.weights_search_path`, the
            bundled file for ``"compact"``; a ``.safetensors`` file brings its own network
            configuration unless ``config`` is given).
        kind: ``"full"``: (moving, fixed) -> map, displacement, with every warp in the graph
            (GridSample, opset >= 20). ``"stages"``: each U-Net alone, using only
            :data:`STAGE_OPS` (for TensorRT), opset >= 13.
        opset: default 20 for ``"full"``, 17 for ``"stages"``.
        dtype: ``"float32"`` or ``"float16"`` (see :func:`full_graph` and :func:`stage_graph`).
        batch: the static batch size of the inputs. The engine runs a graph of batch G on any
            number of images, in chunks of G (the last one padded).
        cpu_rewrites: full graph only (default on): transposed convolutions as sub-pixel
            convolutions and the last convolution as a 2-D one, the same arithmetic in the forms
            ONNX Runtime's CPU provider runs fast (see :mod:`mgr_engine.export.graph`). The stage
            graphs keep the plain ops TensorRT wants.

    Raises :class:`~mgr_engine.errors.OnnxError` (opset, kind, dtype),
    :class:`~mgr_engine.errors.CheckpointError` (weights of another architecture),
    :class:`~mgr_engine.errors.WeightsNotFoundError`, :class:`~mgr_engine.errors.OutputWriteError`,
    each before anything is written.
    """
    from ..engine import MODELS, check_flag, check_model, load_checkpoint, resolve_weights
    from ..model import GradICONNetwork, as_network_config, load_official_state_dict, read_safetensors
    from .graph import _onnx

    if kind not in KINDS:
        raise OnnxError(f"unknown kind {kind!r}: 'full' (one graph with the warps) or 'stages' (the four U-Nets)")
    if dtype not in DTYPES:
        raise OnnxError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if kind == "stages" and cpu_rewrites:
        raise OnnxError("cpu_rewrites applies to the full graph; the stage graphs keep the plain TensorRT op set")
    check_model(model)
    config = as_network_config(config)
    if not isinstance(batch, numbers.Integral) or isinstance(batch, bool) or batch < 1:
        raise OnnxError(f"batch must be a whole number of at least 1, got {batch!r}")
    if cpu_rewrites is not None:  # "no" was a silent True
        check_flag(cpu_rewrites, "cpu_rewrites")
    opset = check_opset(kind, DEFAULT_OPSET[kind] if opset is None else opset)
    onnx = _onnx()
    targets = _output_paths(Path(path), kind)  # fails early on an unwritable place

    if isinstance(weights, dict):
        state = weights
    else:
        weights_path = resolve_weights(model, weights)
        if weights_path.suffix == ".safetensors":  # the bundled compact model's, mgr-engine train's: its own network
            state, saved_config, _ = read_safetensors(weights_path)
            config = config or saved_config
        else:
            state = load_checkpoint(weights_path)
    network = GradICONNetwork(config or MODELS[model], initialize=False)
    load_official_state_dict(network, state)  # CheckpointError naming the offending keys
    network.eval()

    if kind == "full":
        models = [full_graph(network, opset=opset, dtype=dtype, batch=batch,
                             cpu_rewrites=True if cpu_rewrites is None else bool(cpu_rewrites))]
    else:
        models = [stage_graph(network, i, opset=opset, dtype=dtype, batch=batch) for i in range(4)]
    for graph in models:
        onnx.checker.check_model(graph)
    if kind == "stages" and not Path(path).is_dir():
        try:
            Path(path).mkdir()
        except OSError as exc:
            raise OutputWriteError(f"cannot create the directory {str(path)!r} ({exc.strerror}).") from exc
    target = targets[0]
    try:  # all or none (the four stage graphs too), with the mode the umask gives, as the other outputs
        with staged_outputs() as stage:
            for target, graph in zip(targets, models):
                Path(stage(target)).write_bytes(graph.SerializeToString())
    except OutputWriteError:
        raise
    except OSError as exc:  # named as the output, not as its hidden staging file
        raise OutputWriteError(f"cannot write {str(target)!r} ({exc.strerror or exc}); choose a writable place.") from exc
    return targets


def _output_paths(path: Path, kind: str) -> list:
    """Where the graphs go; :class:`OutputWriteError` unless that place exists and is writable."""
    if kind == "full":
        if path.is_dir():
            raise OutputWriteError(f"{str(path)!r} is a directory; the full graph needs a file name such as "
                                   f"{str(path / 'gradicon.onnx')!r}.")
        directory, targets = path.parent if str(path.parent) else Path("."), [path]
    else:
        if path.exists() and not path.is_dir():
            raise OutputWriteError(f"{str(path)!r} is a file; kind='stages' writes a directory of four graphs.")
        targets = [path / name for name in STAGE_FILES]
        directory = path if path.is_dir() else (path.parent if str(path.parent) else Path("."))  # created when writing
    if not directory.is_dir():
        raise OutputWriteError(f"output directory {str(directory)!r} does not exist{tilde_hint(directory)}; create it "
                               "first.")
    try:  # the only reliable test of writability (permissions, read-only mounts, root)
        fd, probe = tempfile.mkstemp(prefix=".mgr_engine-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputWriteError(f"cannot write to {str(directory)!r} ({exc.strerror}); choose a writable place.") from exc
    return targets

