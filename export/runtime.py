"""Running the exported graphs with ONNX Runtime: the engine's ``backend="onnxruntime"``.

* a **full** graph (one ``.onnx`` file) runs the whole network: (moving, fixed) -> map;
* **stage** graphs (a directory of ``psi1.onnx`` .. ``psi4.onnx``) run the four U-Nets,
  and the pooling, warps and compositions between them run in PyTorch through
  :class:`mgr_engine.GradICONNetwork` itself (:mod:`mgr_engine.ops`), whose U-Net modules
  are replaced by :class:`OnnxUNet` (:func:`stage_network`). This is how an engine would pair
  TensorRT U-Nets with its own warp kernels.

Images go in and maps come out as torch tensors; preprocessing, instance optimization and
the ITK outputs stay in PyTorch/ITK.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InvalidOptionError, MissingDependencyError, OnnxError, tilde_hint
from ..model import GradICONNetwork, NetworkConfig

STAGE_FILES = ("psi1.onnx", "psi2.onnx", "psi3.onnx", "psi4.onnx")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
# float32 arithmetic, as the torch backend's default precision: ONNX Runtime's CUDA provider
# otherwise lets cuDNN run float32 convolutions in TF32 (its option use_tf32, default on since
# onnxruntime 1.18, microsoft/onnxruntime#19426).
PROVIDER_OPTIONS = {"CUDAExecutionProvider": {"use_tf32": "0"}}


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "backend='onnxruntime' needs onnxruntime: pip install 'mgr_engine[onnx]' (CPU), or "
            "'mgr_engine[onnx-gpu]' for the CUDA and TensorRT providers."
        ) from exc
    return onnxruntime


def choose_providers(providers=None, device=None) -> list:
    """ONNX Runtime execution providers, in order of preference.

    ``providers``: names (``"CUDAExecutionProvider"``) or short names (``"cpu"``, ``"cuda"``,
    ``"tensorrt"``); each must be available in the installed onnxruntime. Default: CUDA then
    CPU when onnxruntime-gpu is installed and ``device`` is not ``"cpu"``, else CPU.
    """
    available = _ort().get_available_providers()
    if providers is None:
        use_cuda = "CUDAExecutionProvider" in available and (device is None or torch.device(device).type != "cpu")
        return (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p]
    chosen = [PROVIDERS.get(str(p).lower(), str(p)) for p in providers]
    missing = [p for p in chosen if p not in available]
    if missing or not chosen:
        raise InvalidOptionError(
            f"ONNX Runtime provider(s) {', '.join(missing) or '(none given)'} not available; this onnxruntime has "
            f"{', '.join(available)}. CUDA and TensorRT need onnxruntime-gpu (pip install 'mgr_engine[onnx-gpu]').")
    return chosen


def session_options(threads: int | None = None):
    """The ``onnxruntime.SessionOptions`` the engine uses: all graph optimizations, and memory
    settings measured on the full graph at 175^3 (see the comments)."""
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Memory: with ONNX Runtime's defaults the full graph at 175^3 peaked at 5.3 GB and its
    # arena held 9.6 GB after the second call. Without the arena, freed tensors go back to
    # the system; without buffer reuse, the planner no longer stretches tensors' lifetimes to
    # share buffers (that alone kept 3 GB alive): 2.2 GB peak, 1.2 GB between calls.
    options.enable_cpu_mem_arena = False
    if hasattr(options, "enable_mem_reuse"):  # not in every onnxruntime release
        options.enable_mem_reuse = False
    if threads:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3  # errors only: the CPU provider's fp16 fallback warns otherwise
    return options


def load_session(model, *, providers=None, device=None, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` for ``model`` (a path, serialized bytes or an
    ``onnx.ModelProto``), all graph optimizations on."""
    ort = _ort()
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif not isinstance(model, (bytes, bytearray)):
        path = Path(model)
        if not path.is_file():
            raise OnnxError(f"ONNX model {str(path)!r} does not exist{tilde_hint(path)}; export one with "
                            "mgr_engine.export_onnx or `mgr-engine export-onnx`.")
        model = str(path)
    options = session_options(threads)
    try:
        chosen = choose_providers(providers, device)
        return ort.InferenceSession(model, options, providers=chosen,
                                    provider_options=[PROVIDER_OPTIONS.get(name, {}) for name in chosen])
    except (InvalidOptionError, MissingDependencyError):
        raise
    except Exception as exc:
        where = "the given model" if isinstance(model, (bytes, bytearray)) else repr(model)
        raise OnnxError(f"ONNX Runtime cannot load {where}: {exc}") from exc


def _numpy_type(onnx_type: str):
    return np.float16 if onnx_type == "tensor(float16)" else np.float32


def _check_io(session, inputs, outputs, shapes, what: str):
    """:class:`OnnxError` unless ``session`` has these inputs/outputs with these spatial shapes."""
    have_in = {i.name: i for i in session.get_inputs()}
    have_out = {o.name: o for o in session.get_outputs()}
    problems = [f"no input {name!r}" for name in inputs if name not in have_in]
    problems += [f"no output {name!r}" for name in outputs if name not in have_out]
    for name in inputs:
        if name in have_in and [int(n) if isinstance(n, int) else n for n in have_in[name].shape[2:]] != list(shapes):
            problems.append(f"input {name!r} has shape {have_in[name].shape}, the engine needs (B, 1, "
                            f"{', '.join(map(str, shapes))})")
    if problems:
        raise OnnxError(f"{what} does not fit this engine: {'; '.join(problems)}. Export it with "
                        "mgr_engine.export_onnx for the same model and network input shape.")


def _run(session, feeds: dict, output: str) -> torch.Tensor:
    """Run ``session`` on torch tensors (B, ...). A graph of a fixed batch G runs the batch in
    chunks of G; a last, smaller chunk is padded with copies of its last image, whose outputs
    are dropped (so a batch-2 graph also serves a data set of odd length)."""
    specs = {i.name: i for i in session.get_inputs()}
    batch = next(iter(feeds.values())).shape[0]
    graph_batch = next(iter(specs.values())).shape[0]
    chunk = graph_batch if isinstance(graph_batch, int) else batch
    results = []
    for start in range(0, batch, chunk):
        feed = {}
        for name, tensor in feeds.items():
            value = tensor[start:start + chunk].detach().cpu()
            if len(value) < chunk:
                value = torch.cat([value, value[-1:].expand(chunk - len(value), *value.shape[1:])])
            feed[name] = np.ascontiguousarray(value.numpy().astype(_numpy_type(specs[name].type)))
        result = session.run([output], feed)[0][:batch - start]
        results.append(torch.from_numpy(result.astype(np.float32, copy=False)))
    return torch.cat(results) if len(results) > 1 else results[0]


class OnnxUNet(nn.Module):
    """A stage graph standing in for one :class:`~mgr_engine.model.UNet`: (moving, fixed) -> displacement."""

    def __init__(self, session, shape, name: str = "stage graph"):
        super().__init__()
        _check_io(session, ("moving", "fixed"), ("displacement",), shape, name)
        self.session = session

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return _run(self.session, {"moving": moving, "fixed": fixed}, "displacement").to(moving.device)


def stage_network(config: NetworkConfig, sessions) -> GradICONNetwork:
    """The network with its four U-Nets running as the stage graphs ``sessions`` in ONNX
    Runtime, everything between them (pooling, warps, compositions) in PyTorch."""
    if len(sessions) != 4:
        raise OnnxError(f"the stage pipeline needs 4 stage graphs (psi1..psi4), got {len(sessions)}")
    full, half, quarter = config.level_shapes()
    network = GradICONNetwork(config, initialize=False)
    network.unets = nn.ModuleList(
        OnnxUNet(s, shape, f"stage graph psi{i + 1}") for i, (s, shape) in enumerate(zip(sessions, (quarter, half, full, full))))
    return network.eval()


class FullGraph:
    """A full graph as a callable ``(moving, fixed) -> map``, like the network's ``forward``."""

    def __init__(self, session, shape, name: str = "the full graph"):
        _check_io(session, ("moving", "fixed"), ("map",), shape, name)
        self.session = session

    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return _run(self.session, {"moving": moving, "fixed": fixed}, "map").to(moving.device)


def onnx_predictor(onnx_model, config: NetworkConfig, *, network: GradICONNetwork | None = None,
                   providers=None, device=None, threads: int | None = None):
    """A callable ``(moving, fixed) -> map`` running in ONNX Runtime.

    ``onnx_model``: a full graph (``.onnx`` file), a directory of stage graphs
    (``psi1.onnx`` .. ``psi4.onnx``, as ``export_onnx(kind="stages")`` writes them), or ``None``:
    the full graph exported in memory from ``network``'s weights.
    """
    shape = tuple(config.input_shape)
    if onnx_model is None:
        if network is None:
            raise OnnxError("onnx_predictor needs an ONNX model or a network to export")
        from .graph import full_graph

        session = load_session(full_graph(network).SerializeToString(), providers=providers, device=device,
                               threads=threads)
        return FullGraph(session, shape)
    path = Path(onnx_model)
    if path.is_dir():
        missing = [name for name in STAGE_FILES if not (path / name).is_file()]
        if missing:
            raise OnnxError(f"{str(path)!r} is a directory but lacks the stage graphs {', '.join(missing)}; pass a "
                            "full-graph .onnx file or a directory written by export_onnx(kind='stages').")
        sessions = [load_session(path / name, providers=providers, device=device, threads=threads) for name in STAGE_FILES]
        pipeline = stage_network(config, sessions)

        def run_stages(moving, fixed):
            with torch.no_grad():
                return pipeline.to(moving.device)(moving, fixed)

        return run_stages
    return FullGraph(load_session(path, providers=providers, device=device, threads=threads), shape, repr(str(path)))
