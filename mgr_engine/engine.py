"""The registration engine: weights, preprocessing, inference, instance optimization, results."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import numbers
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import host_memory, itk_io, resample
from . import model as _model  # its process-wide SPLIT_TF32_CONVOLUTIONS, beside the TF32 switches
from .errors import (CheckpointError, InstanceOptimizationError, InvalidImageError, InvalidOptionError, MgrEngineError,
                     WeightsNotFoundError, tilde_hint, with_message)
from .labels import warn_if_linear_on_labels
from .losses import gradicon_regularizer, similarity_by_name, with_constant_targets
from .model import (GradICONNetwork, NetworkConfig, as_network_config, evaluate_map, inference_network,
                    load_official_state_dict, map_on_grid, read_safetensors, uses_subpixel_upconvs)
from .ops import network_memory_format, recomputed_in_backward, warp
from .preprocess import (apply_input_mask, check_intensity_ranges, check_mask, check_modality, check_volume,
                         modality_mismatch, normalize_intensity, resize, resize_mask)

log = logging.getLogger("mgr_engine")

# The compact model (issue 5): the same architecture at 64^3 with four-level U-Nets of
# narrower channels, 1.6 M parameters (the official one: 70.7 M), small enough to train on a
# 2-core CPU (about 1.7 s per step); its weights ship in the package (float16 convolutions).
COMPACT_CONFIG = NetworkConfig(input_shape=(64, 64, 64), down_channels=(2, 8, 16, 32, 64),
                               up_channels=(8, 16, 32, 32))
MODELS = {"multigradicon": NetworkConfig(), "unigradicon": NetworkConfig(), "compact": COMPACT_CONFIG}
BUNDLED_WEIGHTS = {"compact": Path(__file__).parent / "weights" / "compact.safetensors"}
CHECKPOINT_NAME = "Step_2_final.trch"
MASKING_MODES = ("input", "loss", "both")
PRECISIONS = ("fp32", "tf32", "bf16")
BACKENDS = ("torch", "onnxruntime")


class _TF32Switches:
    """cuDNN's and cuBLAS's TF32 switches, and :data:`mgr_engine.model.SPLIT_TF32_CONVOLUTIONS`
    beside them, which are process-wide. A section runs under one of :data:`TF32_SETTINGS`.
    Sections that need the same setting (forwards and IO of any engine, in any thread) run beside
    each other and share one save and restore; a section that needs another waits until those
    end. (Each section saving and restoring on its own let overlapping ones restore the switches
    under each other, and leave them changed after all had ended.) A section nested in one of the
    same thread runs under the outer one's setting."""

    def __init__(self):
        self._changed = threading.Condition()
        self._setting = None  # what the open sections run with
        self._open = 0
        self._saved = None
        self._thread = threading.local()

    @staticmethod
    def _switches():
        return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, _model.SPLIT_TF32_CONVOLUTIONS

    @staticmethod
    def _set(switches):
        cudnn, matmul, split = switches
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul
        _model.SPLIT_TF32_CONVOLUTIONS = split

    @contextlib.contextmanager
    def set_to(self, setting: str):
        switches = TF32_SETTINGS[setting]
        if getattr(self._thread, "depth", 0):  # nested: waiting for the outer section would never end
            yield
            return
        with self._changed:
            while self._open and self._setting != setting:
                self._changed.wait()
            if not self._open:
                self._saved = self._switches()
                self._set(switches)
                self._setting = setting
            self._open += 1
        self._thread.depth = 1
        try:
            yield
        finally:
            self._thread.depth = 0
            with self._changed:
                self._open -= 1
                if not self._open:
                    self._set(self._saved)
                    self._changed.notify_all()


# cuDNN's TF32, cuBLAS's TF32, IO's convolutions as three TF32 products (model.tf32x3): "tf32x3"
# keeps cuBLAS in fp32, since no matrix product of IO goes through the split (the LNCC window's
# banded matrices in the PyTorch path)
TF32_SETTINGS = {"fp32": (False, False, False), "tf32": (True, True, False), "tf32x3": (True, False, True)}
_TF32_SWITCHES = _TF32Switches()
IO_PRECISIONS = tuple(TF32_SETTINGS)  # instance optimization's: one TF32 setting each (see Engine.instance_optimize)


def resolve_device(device=None) -> torch.device:
    """``device`` as a ``torch.device`` (``None``: CUDA when available, else the CPU), or
    :class:`InvalidOptionError` where this machine cannot run on it: torch's own errors there
    ("Torch not compiled with CUDA enabled", an AssertionError) came from deep in the first
    registration, after the weights had loaded."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidOptionError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N' (N: the GPU's index), "
                                 "or leave it out for CUDA where available") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = (f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
                   else "torch sees no GPU (check the driver with nvidia-smi, and CUDA_VISIBLE_DEVICES)")
            raise InvalidOptionError(f"device {str(resolved)!r} is not available: {why}; use device 'cpu'")
        if resolved.index is not None and resolved.index >= count:
            raise InvalidOptionError(f"device {str(resolved)!r} does not exist: torch sees {count} GPU"
                                     f"{'s' if count > 1 else ''} (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidOptionError("device 'mps' is not available on this machine (Apple GPUs only); use device 'cpu'")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        # 'meta' holds no data (the engine loaded, its first registration failed); 'xpu' and the
        # like raised torch's AssertionError where absent. Untested here either way.
        backend = getattr(torch, resolved.type, None)
        if resolved.type == "meta" or not (backend and hasattr(backend, "is_available") and backend.is_available()):
            raise InvalidOptionError(f"device {str(resolved)!r} is not one this machine can register on: use 'cpu', "
                                     "'cuda' or 'cuda:N', or leave it out for CUDA where available")
    return resolved


def check_model(model) -> None:
    """Raise :class:`InvalidOptionError` unless ``model`` names one of :data:`MODELS`."""
    if model not in MODELS:
        raise InvalidOptionError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")


def weights_search_path(model: str = "multigradicon") -> list[Path]:
    """Where weights for ``model`` are looked for when no path is given, in order: for the
    bundled compact model its file in the package."""
    check_model(model)
    if model in BUNDLED_WEIGHTS:
        return [BUNDLED_WEIGHTS[model]]
    places = []
    if os.environ.get("MGR_ENGINE_WEIGHTS_DIR"):
        places.append(Path(os.environ["MGR_ENGINE_WEIGHTS_DIR"]) / f"{model}1.0" / CHECKPOINT_NAME)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    places.append(cache / "mgr_engine" / f"{model}1.0" / CHECKPOINT_NAME)
    return places


def resolve_weights(model: str, weights=None) -> Path:
    """The checkpoint file to load: ``weights`` if given, else the first file on the search path.
    Nothing is downloaded."""
    if weights is not None:
        _check_weights_type(weights)
        path = Path(weights)
        if path.is_dir():  # the checkpoint's folder given for the file
            inside = [file for pattern in (CHECKPOINT_NAME, f"*/{CHECKPOINT_NAME}", "*.safetensors")
                      for file in sorted(path.glob(pattern))]  # not deeper: it may be a home folder
            raise WeightsNotFoundError(
                f"weights {str(path)!r} is a directory; give the checkpoint file"
                + (f": {str(inside[0])!r}?" if inside else f" ({CHECKPOINT_NAME} or a .safetensors file), not its folder."))
        if not path.is_file():
            raise WeightsNotFoundError(f"weights file {str(path)!r} does not exist{tilde_hint(path)}; check the path.")
        return path
    if model in BUNDLED_WEIGHTS:
        if BUNDLED_WEIGHTS[model].is_file():
            return BUNDLED_WEIGHTS[model]
        raise WeightsNotFoundError(
            f"the bundled {model} model has not been trained yet: {BUNDLED_WEIGHTS[model]} does not exist. "
            "Train one with `mgr-engine train` (it writes RUN_DIR/compact.safetensors) and pass "
            "weights=that file, or use model='multigradicon' with the official checkpoint.")
    candidates = weights_search_path(model)
    for path in candidates:
        if path.is_file():
            return path
    raise WeightsNotFoundError(
        f"no weights for model {model!r}. Looked in: {', '.join(str(p) for p in candidates)}. "
        f"Download {CHECKPOINT_NAME} from the uniGradICON project's GitHub release "
        f"'{model}_weights' on a machine with internet access, then either pass weights=PATH, "
        f"or copy it to $MGR_ENGINE_WEIGHTS_DIR/{model}1.0/{CHECKPOINT_NAME}, "
        f"or to {candidates[-1]}."
    )


def _check_weights_type(weights) -> None:
    """:class:`InvalidOptionError` unless ``weights`` is a path or a state dict (a list was read
    as the file name "[1]")."""
    if not isinstance(weights, (str, os.PathLike, dict)):
        raise InvalidOptionError(f"weights must be a checkpoint's path or a state dict, got a {type(weights).__name__}")


def load_checkpoint(path) -> dict:
    """A state dict from a ``.trch`` file (``torch.load``, tensors only) or a ``.safetensors``
    file written by mgr_engine (:func:`mgr_engine.model.read_safetensors`)."""
    if Path(path).suffix == ".safetensors":
        return read_safetensors(path)[0]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} ({exc.__class__.__name__}); expected a torch state dict "
            f"such as {CHECKPOINT_NAME}."
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a state dict; pass the regis_net "
            f"state dict ({CHECKPOINT_NAME}), not a whole model or a list of tensors.")
    return state


def check_io_precision(precision) -> None:
    """Instance optimization's arithmetic: one of :data:`IO_PRECISIONS`."""
    if precision not in IO_PRECISIONS:
        raise InvalidOptionError(f"instance optimization precision {precision!r}: choose one of "
                                 f"{', '.join(IO_PRECISIONS)} (bf16 is for the forward without IO)")


def check_io_lr(lr) -> None:
    """Instance optimization's Adam learning rate: a positive finite number."""
    if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise InvalidOptionError(f"io_lr must be a positive finite number, got {lr!r}")


def check_flag(value, name: str) -> None:
    """Raise :class:`InvalidOptionError` unless ``value`` is True or False: a string such as
    ``"no"`` is truthy, and ``inverse="no"`` moved points the other way without a word."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidOptionError(f"{name} must be True or False, got {value!r}")


_FLAG_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _environment_flag(variable: str, default: bool) -> bool:
    """An environment variable read as a switch: 1/true/yes/on or 0/false/no/off (any case);
    unset or empty, ``default``. Anything else is an :class:`InvalidOptionError`: "false" read as
    "not 0" switched it on."""
    value = os.environ.get(variable, "").strip()
    if not value:
        return default
    if value.lower() not in _FLAG_WORDS:
        raise InvalidOptionError(f"{variable}={value!r}: give 1 or 0 (true/false, yes/no, on/off)")
    return _FLAG_WORDS[value.lower()]


def _is_count(n) -> bool:
    """Whether ``n`` is a whole number >= 1: NumPy's integers too (a batch size computed with
    numpy), not True."""
    return isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1


def check_io_iterations(iterations) -> None:
    """Instance optimization's number of steps: ``None`` or a whole number >= 0 (0 and ``None``:
    no IO). 2.5 ran 2 steps, ``True`` one and ``"2"`` two, without a word; NaN raised a bare
    ValueError."""
    if iterations is None:
        return
    whole = (isinstance(iterations, numbers.Real) and not isinstance(iterations, bool) and math.isfinite(iterations)
             and float(iterations).is_integer())
    if not whole or iterations < 0:
        raise InvalidOptionError(f"io_iterations must be a whole number of steps >= 0 (None or 0: no instance "
                                 f"optimization), got {iterations!r}")


_RANGE_SLACK = 0.1  # network inputs this far beyond [0, 1] are not warned about


def network_input(tensor, name: str, shape, *, check_values: bool = True, warn_range=None) -> torch.Tensor:
    """``tensor`` (a torch tensor or a numpy array) checked as the network's input, float32:
    ``(B, 1, *shape)``, floating point, and (``check_values``) finite and within [0, 1], as
    :meth:`Engine.preprocess` gives it. Values beyond [-0.1, 1.1] go to ``warn_range(message)``,
    not refused; a normalization of one's own may overshoot a little, harmlessly, and would use up
    a once-per-engine warning that raw values later need. A double array ran
    into "Input type (double) and bias type (float)", a missing batch axis into "rank 5 tensor",
    raw CT values gave a map without a word."""
    if not isinstance(tensor, torch.Tensor):
        if not hasattr(tensor, "__array__"):
            raise InvalidImageError(f"{name} is a {type(tensor).__name__}, not a tensor: give a (B, 1, "
                                    f"{', '.join(map(str, shape))}) torch tensor preprocessed to [0, 1].")
        tensor = torch.tensor(np.asarray(tensor))  # a copy: a read-only array is no trouble
    expected = (1, *shape)
    if tensor.dim() != 5 or tuple(tensor.shape[1:]) != expected:
        hint = (" (tensor[None, None] adds the batch and channel axes)" if tuple(tensor.shape) == tuple(shape)
                else "; images of other sizes go through Engine.preprocess, or Engine.register, which resize them")
        raise InvalidImageError(f"{name} must be a (B, {', '.join(map(str, expected))}) tensor, a batch of volumes "
                                f"on the network's grid, got {tuple(tensor.shape)}{hint}.")
    if not tensor.is_floating_point():
        raise InvalidImageError(f"{name} is {str(tensor.dtype).removeprefix('torch.')}: the network takes "
                                "floating-point intensities preprocessed to [0, 1] (Engine.preprocess).")
    tensor = tensor.float()
    if check_values:
        low, high = torch.aminmax(tensor)  # one pass (1 ms at 175^3); NaN propagates into both
        if not (math.isfinite(low) and math.isfinite(high)):
            bad = int((~torch.isfinite(tensor)).sum())
            raise InvalidImageError(f"{name} has {bad} NaN or infinite voxels; the maps would be NaN. Replace them "
                                    "(for example with the background value) first.")
        if (low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK) and warn_range is not None:
            warn_range(f"{name}'s values span [{float(low):g}, {float(high):g}], not [0, 1]: the network was "
                       "trained on intensities preprocessed to [0, 1] (Engine.preprocess, or Engine.register for "
                       "images); raw values (CT in HU, MRI in scanner units) give a meaningless map")
    return tensor


def loss_mask_input(mask, name: str, image: torch.Tensor) -> torch.Tensor:
    """IO's loss mask checked against its image (its shape broadcasts to the image's, a voxel
    inside): a mask of another size raised torch's "expanded size", an empty one
    left IO to optimize the regularizer alone, without a word."""
    if not isinstance(mask, torch.Tensor):
        mask = torch.tensor(np.asarray(mask))
    try:
        fits = torch.broadcast_shapes(mask.shape, image.shape) == image.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise InvalidImageError(f"{name} has shape {tuple(mask.shape)}, which does not fit its image's "
                                f"{tuple(image.shape)}: give a mask on the network's grid.")
    if mask.is_floating_point() and not torch.isfinite(mask).all():
        raise InvalidImageError(f"{name} has NaN or infinite voxels; give a binary mask (0 outside, 1 inside).")
    if not (mask != 0).any():
        raise InvalidImageError(f"{name} is empty (no voxel inside): IO would optimize the regularizer alone. Give a "
                                "mask that covers the region to align, or none.")
    return mask


def gradicon_objective(network: GradICONNetwork, moving, fixed, similarity, *, lmbda=1.5,
                       moving_mask=None, fixed_mask=None, generator=None, loss_moving=None, loss_fixed=None):
    """The GradICON loss of the paper (eq. 3) for one pair, and both maps on the grid.

    ``sim(moving o phi_AB, fixed) + sim(fixed o phi_BA, moving) + lmbda * GradICON``;
    images are warped with zero padding. ``loss_moving``/``loss_fixed``: other images of the
    same two patients, aligned with ``moving``/``fixed``, to compare in the similarity instead
    of the network's inputs (similarity-loss randomization, eq. 4); default the inputs.
    """
    fields_ab = network.displacement_fields(moving, fixed)
    fields_ba = network.displacement_fields(fixed, moving)
    identity = network.identity_full
    loss_moving = moving if loss_moving is None else loss_moving
    loss_fixed = fixed if loss_fixed is None else loss_fixed

    def map_and_warped(image, *fields):
        phi = map_on_grid(fields, identity)
        return phi, warp(image, phi)

    recompute = network.recomputes_maps(moving.device)
    phi_ab, warped_ab = recomputed_in_backward(map_and_warped, loss_moving, *fields_ab, recompute=recompute)
    phi_ba, warped_ba = recomputed_in_backward(map_and_warped, loss_fixed, *fields_ba, recompute=recompute)
    similarity_loss = similarity(warped_ab, loss_fixed, fixed_mask) + similarity(warped_ba, loss_moving, moving_mask)
    regularizer = gradicon_regularizer(
        functools.partial(evaluate_map, fields_ab), functools.partial(evaluate_map, fields_ba), identity, generator,
        recompute=recompute)
    return lmbda * regularizer + similarity_loss, phi_ab, phi_ba


class Engine:
    """A loaded network, kept resident between registrations.

    Args:
        model: ``"multigradicon"`` or ``"unigradicon"`` (same architecture, different weights), or
            ``"compact"`` (64^3, narrower; weights bundled in the package).
        weights: path of the checkpoint (``Step_2_final.trch``, the ``regis_net`` state dict, or a
            ``.safetensors`` file from ``mgr-engine train``, whose stored NetworkConfig is used
            unless ``config`` is given) or a state dict (tensors or NumPy arrays). ``None``: for
            ``"compact"`` the file in the package; otherwise
            ``$MGR_ENGINE_WEIGHTS_DIR/<model>1.0/Step_2_final.trch``, then the user cache
            directory. Nothing is downloaded.
        device: torch device; default CUDA when available, else CPU.
        config: network shape (a :class:`NetworkConfig` or a dict of its fields), for checkpoints
            of non-official configurations.
        backend: ``"torch"``, or ``"onnxruntime"``: the network's forward (no IO) runs in ONNX
            Runtime; instance optimization stays in PyTorch (see :mod:`mgr_engine.export`).
        onnx_model: with ``backend="onnxruntime"``: a full-graph ``.onnx`` file or a directory of
            stage graphs (both written by :func:`mgr_engine.export_onnx`); ``None`` exports the
            full graph from ``weights`` in memory.
        onnx_providers: ONNX Runtime providers (``"cpu"``, ``"cuda"``, ``"tensorrt"`` or full
            names); default CUDA when onnxruntime-gpu is installed and ``device`` is not CPU.
        precision: arithmetic of the no-IO forward: ``"fp32"`` (default; also switches off the
            TF32 convolutions cuDNN would otherwise use), ``"tf32"`` (CUDA) or ``"bf16"``
            (autocast; maps and sampling stay float32). Both are for CUDA: on the CPU ``"tf32"``
            runs in fp32 (with a warning), and ``"bf16"`` made ``predict_map`` at 175^3 slower on
            both 2-core CPUs measured, 1.7-1.8 against 1.6 s in fp32 on an AMD EPYC with
            AVX512-BF16, 2.34 against 2.06 s on an Intel Xeon with AMX-BF16, its points there
            0.53 voxel from fp32's. Instance optimization is fp32 unless
            :meth:`instance_optimize` is given ``precision="tf32"`` or ``"tf32x3"``.
        compile: ``torch.compile`` the no-IO forward (with CUDA graphs on a GPU, mode
            ``"reduce-overhead"``): for a resident engine that registers many pairs, since the
            first call compiles for minutes (131 s at 175^3 on the 2-core CPU).
        io_checkpointing: recompute U-Net activations in IO's backward pass instead of keeping
            them: less memory, more time. At 175^3 on the 2-core AMD EPYC with freed host memory
            returned, peak 6.9 -> 5.3 GiB, one IO step 26.5 -> 28.0 s (one call each,
            ``benchmarks/bench_low_memory_conv.py``); the default path already recomputes what
            is cheap (:func:`mgr_engine.model.low_memory_conv`; on a GPU, and on the CPU with
            this option, the maps of the compositions and warps too,
            :meth:`mgr_engine.model.GradICONNetwork.recomputes_maps`).
        cache_host_memory: on the CPU, keep freed host memory in the process for reuse instead
            of returning it to the system after each large tensor (:mod:`mgr_engine.host_memory`,
            glibc only; process-wide): at 175^3 an IO step and ``predict_map`` 1.7x faster, for a
            higher peak (IO 7.2 -> 10.1 GiB; ``benchmarks/bench_host_memory.py``). ``None``
            (default): on for a CPU engine unless ``MGR_ENGINE_CACHE_HOST_MEMORY=0``.
            :func:`mgr_engine.release_host_memory` undoes it.
    """

    def __init__(self, model: str = "multigradicon", weights=None, device=None, *, config: NetworkConfig | None = None,
                 backend: str = "torch", onnx_model=None, onnx_providers=None, precision: str = "fp32",
                 io_checkpointing: bool = False, compile: bool = False, cache_host_memory: bool | None = None):
        check_model(model)
        if backend not in BACKENDS:
            raise InvalidOptionError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if backend != "onnxruntime" and (onnx_model is not None or onnx_providers is not None):
            raise InvalidOptionError("onnx_model and onnx_providers need backend='onnxruntime'")
        if precision not in PRECISIONS:
            raise InvalidOptionError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        check_flag(compile, "compile")  # compile="no" compiled for minutes
        check_flag(io_checkpointing, "io_checkpointing")
        if cache_host_memory is not None:
            check_flag(cache_host_memory, "cache_host_memory")
        if backend == "onnxruntime" and (compile or precision != "fp32"):
            # Both act on the torch forward; ONNX Runtime would silently ignore them.
            raise InvalidOptionError("compile and precision apply to backend='torch'; ONNX Runtime runs the "
                                     "exported graph as it is: drop them, or use backend='torch'")
        self.precision = precision
        self.backend = backend
        # IO adapts self.network's weights in place, and CUDA graphs replay into the same output
        # memory: each of the two runs one call at a time, so that threads can share an engine.
        self._weights_lock = threading.Lock()
        self._orientations_warned = set()  # (fixed's axis codes, moving's): warned once per engine
        self._modalities_warned = set()  # (image's role, modality): likewise
        self._range_warned = False  # tensors far outside [0, 1] given to predict_map or instance_optimize
        self._precisions_warned = set()  # TF32 settings asked of a device without TF32
        self._graph_lock = threading.Lock()
        self.model = model
        config = as_network_config(config)
        self.config = config or MODELS[model]
        self.device = resolve_device(device)
        if cache_host_memory is None:
            cache_host_memory = _environment_flag("MGR_ENGINE_CACHE_HOST_MEMORY", default=True)
        if cache_host_memory and self.device.type == "cpu":
            host_memory.keep_freed_memory()
        # Preprocessing defaults a safetensors file declares (MRI quantile range, CT window),
        # used where a call passes none: the compact model's, as it was trained.
        self.preprocessing = {}
        if isinstance(weights, dict):
            state, source = weights, "a state dict"
        else:
            path = resolve_weights(model, weights)
            source = str(path)
            if path.suffix == ".safetensors":
                state, saved_config, metadata = read_safetensors(path)
                self.config = config or saved_config or self.config
                self.preprocessing = json.loads(metadata.get("preprocessing", "{}"))
            else:
                state = load_checkpoint(path)
        self.network = GradICONNetwork(self.config, initialize=False)
        load_official_state_dict(self.network, state)
        self.network.eval().to(self.device, memory_format=network_memory_format(self.device)).requires_grad_(False)
        self.network.checkpoint_unets = io_checkpointing
        # CUDA graphs (reduce-overhead) write each call's outputs into the same memory:
        # predict_map hands out a copy, or the next call would overwrite (then refuse) it.
        self._outputs_reused = compile and self.device.type == "cuda"
        if backend == "onnxruntime":
            from .export.runtime import onnx_predictor

            self.inference_network = onnx_predictor(onnx_model, self.config, network=self.network,
                                                    providers=onnx_providers, device=device)
        else:
            self.inference_network = self._inference_copy()
            if compile:
                mode = "reduce-overhead" if self._outputs_reused else None
                self.inference_network = torch.compile(self.inference_network, mode=mode, fullgraph=True)
                # torch.compile says nothing while it works: a first call looked hung
                log.info("compile=True: the first registration (and the first of each new batch size) compiles "
                         "the network first, for minutes on a CPU")
        if "itk" in sys.modules:  # a program of images: ITK's module loader, now rather than under its threads
            itk_io.load_array_views()
        if self.config == MODELS[model]:
            log.info("loaded %s weights from %s on %s", model, source, self.device)
        else:  # a config given, or a .safetensors file's own (mgr-engine train's): not the named model's network
            log.info("loaded weights from %s on %s into a network of input %s, not %s's network", source, self.device,
                     "x".join(map(str, self.config.input_shape)), model)

    def _inference_copy(self) -> GradICONNetwork:
        """BatchNorm folded, the transposed convolutions in sub-pixel form where that is faster
        (:func:`uses_subpixel_upconvs`), in the device's layout (:func:`network_memory_format`)."""
        net = inference_network(self.network, subpixel_upconvs=uses_subpixel_upconvs(self.device))
        return net.to(self.device, memory_format=network_memory_format(self.device))

    @property
    def input_shape(self) -> tuple:
        """The network's input grid (D, H, W): (175, 175, 175) for the official models."""
        return tuple(self.config.input_shape)

    # ------------------------------------------------------------- tensors

    @torch.inference_mode()
    def predict_map(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Map ``Phi[moving, fixed]`` (B, 3, *input_shape) in [0, 1] coordinates, one direction only.

        ``moving``/``fixed``: (B, 1, *input_shape) tensors (or arrays) already preprocessed to
        [0, 1] (:meth:`preprocess`); other floating dtypes are computed in float32. Their values
        (finite, within [0, 1]) are checked on the CPU only: on a GPU that would wait for it.
        """
        moving, fixed = self._network_inputs(moving, fixed, check_values=None)
        if self.backend == "onnxruntime":
            return self.inference_network(moving, fixed).to(self.device)
        layout = network_memory_format(self.device)
        moving = moving.to(self.device).contiguous(memory_format=layout)
        fixed = fixed.to(self.device).contiguous(memory_format=layout)
        with self._graph_lock if self._outputs_reused else contextlib.nullcontext(), self._precision(self.precision):
            phi = self.inference_network(moving, fixed).float().contiguous()
            return phi.clone() if self._outputs_reused else phi

    def warm_up(self, *, batch_size: int = 1, io_sim: str | None = None) -> float:
        """Run the network once on a synthetic pair, so that the first registration pays none of
        the one-time set-up: the device's libraries (cuDNN's and cuBLAS' handles, CUDA's lazy
        loading), Triton's kernels (loaded, or compiled on a first run), with ``compile=True``
        torch.compile's graph for ``batch_size`` pairs (minutes), ONNX Runtime's first run.
        ``io_sim`` (``"lncc2"``, ``"lncc"`` or ``"mind"``): also one instance-optimization step
        with that similarity, for its backward kernels; the weights are restored after it, as
        after any IO. For an engine in a real-time system, call it at start-up. On an H200, a
        fresh process's first registration took 616 ms against 33 ms warm, 555 ms of it in
        Triton's first launches (RESULTS.md, thirty-sixth session). Returns the seconds it took."""
        if not _is_count(batch_size):
            raise InvalidOptionError(f"batch_size {batch_size!r}: give a positive integer")
        if io_sim is not None:
            similarity_by_name(io_sim)  # a typed error before any work
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        moving, fixed = (torch.rand(batch_size, 1, *self.input_shape, generator=generator) for _ in range(2))
        self.predict_map(moving, fixed)
        if io_sim is not None:
            self.instance_optimize(moving[:1], fixed[:1], iterations=1, similarity=io_sim, progress=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        log.info("warm-up: %.2f s%s", seconds, f" (with one {io_sim} IO step)" if io_sim else "")
        return seconds

    def _network_inputs(self, moving, fixed, *, check_values: bool | None):
        """Both inputs checked (:func:`network_input`); ``check_values=None``: where they lie on
        the CPU, where it costs no wait for a GPU."""
        def on_cpu(tensor):  # an array: on the host
            return not isinstance(tensor, torch.Tensor) or tensor.device.type == "cpu"

        moving, fixed = (network_input(tensor, name, self.input_shape, warn_range=self._warn_range_once,
                                       check_values=on_cpu(tensor) if check_values is None else check_values)
                         for tensor, name in ((moving, "moving"), (fixed, "fixed")))
        if len(moving) != len(fixed):
            raise InvalidImageError(f"moving and fixed hold {len(moving)} and {len(fixed)} volumes: give one fixed "
                                    "volume for each moving one.")
        return moving, fixed

    def _warn_range_once(self, message: str) -> None:
        """Warn of network inputs far outside [0, 1] once per engine: a loop over a data set would
        repeat it for every pair."""
        if not self._range_warned:
            self._range_warned = True
            log.warning("%s (said once per engine)", message)

    @contextlib.contextmanager
    def _precision(self, precision: str):
        """TF32 (on CUDA, see :class:`_TF32Switches`) and autocast settings of ``precision``. A TF32
        setting elsewhere runs in fp32, which it says once per engine and setting: a user who asked
        for TF32 on the CPU would otherwise time fp32 and never learn why."""
        if precision in ("tf32", "tf32x3") and self.device.type != "cuda" and precision not in self._precisions_warned:
            self._precisions_warned.add(precision)
            log.warning("precision %r acts on CUDA devices only (TF32 tensor cores); on %s this runs in fp32 "
                        "(said once per engine)", precision, self.device.type)
        tf32 = (_TF32_SWITCHES.set_to(precision if precision in TF32_SETTINGS else "fp32")
                if self.device.type == "cuda" else contextlib.nullcontext())
        with tf32, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield

    def instance_optimize(self, moving: torch.Tensor, fixed: torch.Tensor, *, iterations: int = 50,
                          similarity: str = "lncc2", lr: float = 2e-5, lmbda: float = 1.5,
                          moving_mask: torch.Tensor | None = None, fixed_mask: torch.Tensor | None = None,
                          generator: torch.Generator | None = None, progress: bool = True,
                          precision: str = "fp32"):
        """Instance optimization (IO): ``iterations`` Adam steps on all network weights with the
        GradICON loss, then one more forward whose maps are returned. The engine's weights are
        restored afterwards, so the next call starts from the checkpoint again. Calls from
        several threads run one at a time (each adapts the same weights); :meth:`predict_map`
        goes on beside them.

        ``generator``: the GradICON regularizer's random grid
        (:func:`mgr_engine.losses.regularizer_points`). A CPU generator draws the reference's
        stream (a seeded run reproduces its losses); on a GPU, ``None`` or a CUDA generator draws
        on the device, without host work in each step.

        ``moving``/``fixed``: one pair, (1, 1, *input_shape), as for :meth:`predict_map`.

        ``precision``: ``"fp32"`` (default, whatever the engine's ``precision``), ``"tf32"`` or
        ``"tf32x3"``, for CUDA (elsewhere fp32, with a warning once per engine). ``"tf32"``:
        cuDNN's TF32 tensor cores for IO's convolutions, whose fp32 weight gradients were 61% of
        an IO step's GPU time on an H200 (benchmarks/RESULTS.md); how far it moves IO's result is
        not measured (with randomized weights IO is chaotic at float32 rounding, so only the
        official weights can tell). ``"tf32x3"``: each of the steps' convolutions, input gradients and weight
        gradients as three TF32 products (:func:`mgr_engine.model.tf32x3`), float32's accuracy
        by construction, and the final forward in fp32; its speed on a GPU is not measured yet.

        Returns ``(phi_ab, phi_ba, losses)``: both maps and the loss of each step's forward,
        followed by the loss of the final forward (``iterations + 1`` values).
        """
        from tqdm.auto import tqdm

        check_io_iterations(iterations)
        check_io_precision(precision)
        if iterations is None or iterations < 1:
            raise InvalidOptionError("instance optimization needs iterations >= 1 (use predict_map for none)")
        iterations = int(iterations)
        check_io_lr(lr)
        if not (isinstance(lmbda, numbers.Real) and math.isfinite(lmbda) and lmbda >= 0):
            raise InvalidOptionError(f"lmbda (the GradICON regularizer's weight) must be a finite number >= 0 "
                                     f"(the paper's is 1.5), got {lmbda!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise InvalidOptionError(f"generator must be a torch.Generator (torch.Generator().manual_seed(seed)) or "
                                     f"None, got {type(generator).__name__}")
        sim = with_constant_targets(similarity_by_name(similarity))
        net = self.network
        # Checked on any device: one wait for the GPU before minutes of steps.
        moving, fixed = (tensor.to(self.device) for tensor in self._network_inputs(moving, fixed, check_values=True))
        if len(moving) != 1:  # Adam on shared weights would fit the network to all pairs at once
            raise InvalidImageError(
                f"instance optimization adapts the network to one pair; got a batch of {len(moving)}. Call it once "
                "per pair (tensors of batch 1): on a batch it would optimize one network for all pairs together, "
                "and each pair's map would differ from its own IO's.")
        masks = {
            name: None if mask is None else loss_mask_input(mask, name, image).to(self.device)
            for name, mask, image in (("moving_mask", moving_mask, moving), ("fixed_mask", fixed_mask, fixed))
        }
        with self._weights_lock:  # one IO at a time on these weights
            # The checkpoint's weights, to restore afterwards; on a GPU in host memory, where they
            # do not add to IO's device peak (0.26 GiB of the official network's; 2 x 283 MB of
            # copies per IO call, against 50 steps of work).
            saved = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
            net.requires_grad_(True)
            optimizer = torch.optim.Adam(net.parameters(), lr=lr)
            # Off the CPU each loss stays on the device, read every tenth step: reading it every
            # step (.item()) would make the host wait for the GPU's queue and launch the next
            # step's kernels late. On the CPU it is there already, so a run that diverges stops
            # at once, not after minutes of NaN steps.
            check_every = 1 if self.device.type == "cpu" else 10
            step_losses = []
            try:
                finished = False
                with self._precision(precision):
                    for step in tqdm(range(iterations), desc="instance optimization", disable=not progress,
                                     leave=False):
                        optimizer.zero_grad(set_to_none=True)
                        loss, _, _ = gradicon_objective(net, moving, fixed, sim, lmbda=lmbda, generator=generator, **masks)
                        step_losses.append(loss.detach())
                        recent = step_losses[-check_every:]
                        if (step + 1) % check_every == 0 and not torch.isfinite(torch.stack(recent)).all():
                            break
                        loss.backward()
                        optimizer.step()
                    else:
                        finished = True
                if finished:
                    # tf32x3 splits only the convolutions autograd records, none of this forward's:
                    # its own section (after the steps', which a nested one would not change), fp32
                    with self._precision("fp32" if precision == "tf32x3" else precision), torch.no_grad():
                        loss, phi_ab, phi_ba = gradicon_objective(net, moving, fixed, sim, lmbda=lmbda,
                                                                  generator=generator, **masks)
                    step_losses.append(loss)
                losses = torch.stack(step_losses).tolist()
                diverged = next((index for index, value in enumerate(losses) if not math.isfinite(value)), None)
                if diverged is not None:  # its maps are NaN: no transform to give
                    raise InstanceOptimizationError(
                        f"instance optimization diverged: its loss was {losses[diverged]} "
                        f"{f'after step {diverged}' if diverged else 'before the first step'} of {iterations} "
                        f"(io_lr {lr}); lower io_lr (the reference's is 2e-5) or register without it.")
            finally:
                net.load_state_dict(saved)
                # The last step's gradients would stay on the device until the next IO call.
                net.zero_grad(set_to_none=True)
                net.requires_grad_(False)
        log.info("instance optimization: %d steps, loss %.5f -> %.5f", iterations, losses[0], losses[-1])
        return phi_ab, phi_ba, losses

    # ------------------------------------------------------------- images

    def preprocess(self, image, modality: str, *, name: str = "input", mask=None, ct_window=None,
                   quantile_range=None):
        """An image (anything :meth:`register` takes: a path, ``itk.Image``, array, ...) normalized,
        optionally masked (``mask``: array on its grid), resized to the network input: a tensor
        (1, 1, *input_shape) for :meth:`predict_map`. ``name`` names it in messages."""
        return self._preprocess_image(itk_io.load_image(image, name), modality, name=name, mask=mask,
                                      ct_window=ct_window, quantile_range=quantile_range)

    def _preprocess_image(self, itk_image, modality: str, *, name: str, mask, ct_window, quantile_range):
        """:meth:`preprocess` of an ``itk.Image``, read already."""
        array = itk_io.voxel_array(itk_image)
        low = check_volume(array, name, itk_io.voxel_view(itk_image).dtype)
        mismatch = modality_mismatch(array, modality, ct_window, low)
        if mismatch and (name, modality) not in self._modalities_warned:  # once per engine: a data set's pairs alike
            self._modalities_warned.add((name, modality))
            log.warning("the %s image looks like another modality: %s", name, mismatch)
        if ct_window is None and self.preprocessing.get("ct_window"):
            ct_window = tuple(self.preprocessing["ct_window"])
        if quantile_range is None and self.preprocessing.get("mri_quantile_range"):
            quantile_range = tuple(self.preprocessing["mri_quantile_range"])
        volume = normalize_intensity(array, modality, ct_window=ct_window, quantile_range=quantile_range, name=name)
        if mask is not None:
            volume = apply_input_mask(volume, mask)
        return resize(volume, self.input_shape)[None, None]

    def _load_mask(self, mask, image, name: str):
        if mask is None:
            return None
        mask_image = itk_io.load_image(mask, f"{name} mask", on_grid_of=image)
        itk_io.check_same_grid(mask_image, image, f"{name} mask")
        check_mask(itk_io.voxel_view(mask_image), f"{name} mask")  # an integer mask (most) has no fractions to test
        return itk_io.voxel_array(mask_image)

    def _check_options(self, *, fixed_modality, moving_modality, io_iterations, io_sim, io_lr, io_precision, masking,
                       ct_window, quantile_range, seed, match_orientation) -> None:
        """Refuse unknown or impossible options before any image is read."""
        if masking not in MASKING_MODES:
            raise InvalidOptionError(f"unknown masking {masking!r}: choose one of {', '.join(MASKING_MODES)}")
        check_modality(fixed_modality, "fixed")
        check_modality(moving_modality, "moving")
        check_intensity_ranges(ct_window, quantile_range)
        check_io_iterations(io_iterations)
        check_flag(match_orientation, "match_orientation")
        # torch.manual_seed takes a Python int only: NumPy's (a seed drawn by rng.integers), a
        # float or a string failed with a bare TypeError/RuntimeError after the images were read
        if seed is not None and not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
                                     and -2**63 <= seed < 2**64):
            raise InvalidOptionError(f"seed must be a whole number (a 64-bit integer) or None, got {seed!r}")
        if io_iterations:
            similarity_by_name(io_sim)
            check_io_lr(io_lr)
            check_io_precision(io_precision)

    def _prepare_image(self, image, modality: str, name: str, mask, *, masking, io_iterations, ct_window,
                       quantile_range, orient_like=None):
        """One image of a pair (and its mask) read, checked and preprocessed for the network:
        ``(ITK image, network input, IO's loss mask on the network grid or None, grid as given)``.
        ``orient_like``: an image whose voxel axes this one's are reordered onto, where they differ;
        the grid as given is then the image's before (None where it was not reordered)."""
        itk_image = itk_io.load_image(image, name)
        mask_array = self._load_mask(mask, itk_image, name)
        grid_as_given = None
        if orient_like is not None:
            axes = itk_io.matching_axes(itk_io.ImageGrid.of(itk_image).direction, itk_io.ImageGrid.of(orient_like).direction)
            if axes not in (None, itk_io.IDENTITY_AXES):  # None: left as it is, and warned about
                grid_as_given = itk_io.ImageGrid.of(itk_image)
                itk_image = itk_io.reordered_image(itk_image, *axes)
                mask_array = None if mask_array is None else itk_io.reordered_voxels(mask_array, *axes)
        tensor = self._preprocess_image(itk_image, modality, name=name,
                                        mask=mask_array if masking in ("input", "both") else None,
                                        ct_window=ct_window, quantile_range=quantile_range)
        loss_mask = None
        if io_iterations and masking in ("loss", "both") and mask_array is not None:
            loss_mask = resize_mask(mask_array, self.input_shape)
            if not loss_mask.any():  # IO would then optimize the regularizer alone, without a word
                raise InvalidImageError(
                    f"{name} mask's {int((mask_array != 0).sum())} voxels fall between the samples of the network's "
                    f"{'x'.join(map(str, self.input_shape))} grid, so IO's similarity would see none of the image: "
                    "give a larger mask (a region, not a few voxels), or none.")
        return itk_image, tensor, loss_mask, grid_as_given

    def _prepare_pair(self, fixed, moving, *, fixed_modality, moving_modality, fixed_mask, moving_mask, masking,
                      io_iterations, ct_window, quantile_range, match_orientation=False,
                      fixed_cache: dict | None = None) -> "_PreparedPair":
        """Read both images (and masks), check them, preprocess them for the network.
        ``match_orientation``: reorder the moving image's voxels onto the fixed image's axes.
        ``fixed_cache``: a dict that keeps the last fixed side read from a file, reused while the
        same, unchanged file (with the same mask file) comes again: an atlas registered to a data
        set is read and preprocessed once."""
        options = dict(masking=masking, io_iterations=io_iterations, ct_window=ct_window, quantile_range=quantile_range)
        key = _files_key(fixed, fixed_mask) if fixed_cache is not None else None
        fixed_side = fixed_cache.get(key) if key is not None else None
        if fixed_side is None:
            fixed_side = self._prepare_image(fixed, fixed_modality, "fixed", fixed_mask, **options)
            if key is not None:
                fixed_cache.clear()
                fixed_cache[key] = fixed_side
        moving_side = self._prepare_image(moving, moving_modality, "moving", moving_mask, **options,
                                          orient_like=fixed_side[0] if match_orientation else None)
        self._check_orientations(fixed_side[0], moving_side[0])
        if not io_iterations and masking == "loss" and (fixed_mask is not None or moving_mask is not None):
            log.warning("masks given for loss masking, but without instance optimization there is no loss: "
                        "they are not used (pass masking='input' to mask the network's input)")
        (fixed_image, fixed_tensor, fixed_loss_mask, _), (moving_image, moving_tensor, moving_loss_mask, moving_grid) = (
            fixed_side, moving_side)
        return _PreparedPair(fixed_image, moving_image, fixed_tensor, moving_tensor, fixed_loss_mask, moving_loss_mask,
                             moving_grid)

    def _check_orientations(self, fixed_image, moving_image) -> None:
        """Warn (once per engine and pair of orientations) where the two images' voxel axes point
        in different anatomical directions: the network compares the volumes axis by axis, as
        stored, so it would see the moving anatomy flipped or turned."""
        fixed_direction = itk_io.ImageGrid.of(fixed_image).direction
        moving_direction = itk_io.ImageGrid.of(moving_image).direction
        axes = itk_io.matching_axes(moving_direction, fixed_direction)
        if axes == itk_io.IDENTITY_AXES:
            return
        codes = itk_io.axis_codes(fixed_direction), itk_io.axis_codes(moving_direction)
        if codes in self._orientations_warned:
            return
        self._orientations_warned.add(codes)
        if axes is None:
            advice = ("their axes lie at about 45 degrees to each other, too far from any reordering for "
                      "match_orientation; resample the moving image onto axes near the fixed image's.")
        else:
            advice = ("pass match_orientation=True (mgr-engine: --match_orientation) to reorder the moving "
                      "image's voxels onto the fixed image's axes first (the unigradicon reference does not).")
        log.warning("the fixed image's voxel axes point %s, the moving image's %s: the network compares the "
                    "volumes voxel axis by voxel axis, so it sees the moving anatomy flipped or turned, and the "
                    "registration is likely wrong; %s", *codes, advice)

    def _optimize_pair(self, pair: "_PreparedPair", *, io_iterations, io_sim, io_lr, io_precision, progress,
                       seed) -> "RegistrationResult":
        """Instance optimization on one prepared pair, and its result."""
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        phi_ab, phi_ba, losses = self.instance_optimize(
            pair.moving, pair.fixed, iterations=io_iterations, similarity=io_sim, lr=io_lr, precision=io_precision,
            moving_mask=pair.moving_loss_mask, fixed_mask=pair.fixed_loss_mask, generator=generator, progress=progress)
        return self._result(pair, phi_ab, phi_ba, losses)

    def _result(self, pair: "_PreparedPair", phi_ab, phi_ba=None, losses=()) -> "RegistrationResult":
        return RegistrationResult(
            fixed=pair.fixed_image, moving=pair.moving_image, phi_ab=phi_ab.detach().cpu(),
            phi_ba=None if phi_ba is None else phi_ba.detach().cpu(), io_losses=list(losses),
            device=self.device, _inverse=functools.partial(self.predict_map, pair.fixed, pair.moving),
            _moving_grid_as_given=pair.moving_grid_as_given,
        )

    def register(self, fixed, moving, *, fixed_modality: str = "mri", moving_modality: str = "mri",
                 io_iterations: int | None = 50, io_sim: str = "lncc2", io_lr: float = 2e-5,
                 io_precision: str = "fp32", fixed_mask=None, moving_mask=None, masking: str = "loss", ct_window=None,
                 quantile_range=None, progress: bool = True, seed: int | None = None,
                 match_orientation: bool = False) -> "RegistrationResult":
        """Register ``moving`` onto ``fixed``; see :func:`mgr_engine.register`."""
        started = time.perf_counter()
        self._check_options(fixed_modality=fixed_modality, moving_modality=moving_modality, io_iterations=io_iterations,
                            io_sim=io_sim, io_lr=io_lr, io_precision=io_precision, masking=masking, ct_window=ct_window,
                            quantile_range=quantile_range, seed=seed, match_orientation=match_orientation)
        pair = self._prepare_pair(fixed, moving, fixed_modality=fixed_modality, moving_modality=moving_modality,
                                  fixed_mask=fixed_mask, moving_mask=moving_mask, masking=masking,
                                  io_iterations=io_iterations, ct_window=ct_window, quantile_range=quantile_range,
                                  match_orientation=match_orientation)
        if io_iterations:
            result = self._optimize_pair(pair, io_iterations=io_iterations, io_sim=io_sim, io_lr=io_lr,
                                         io_precision=io_precision, progress=progress, seed=seed)
        else:
            result = self._result(pair, self.predict_map(pair.moving, pair.fixed))
        log.info("registered in %.2f s", time.perf_counter() - started)
        return result

    def register_many(self, pairs, *, batch_size: int = 1, prefetch: int = 2, fixed_modality: str = "mri",
                      moving_modality: str = "mri", io_iterations: int | None = 50, io_sim: str = "lncc2",
                      io_lr: float = 2e-5, io_precision: str = "fp32", masking: str = "loss", ct_window=None,
                      quantile_range=None, progress: bool = True, seed: int | None = None,
                      match_orientation: bool = False, on_error: str = "raise"):
        """Register a stream of pairs: a generator of :class:`RegistrationResult`, in the order of ``pairs``.

        A background thread reads and preprocesses the next pairs while the network works on
        the current ones (at most ``prefetch`` batches ahead). Without instance optimization
        ``batch_size`` pairs go through the network at once; with it each pair is optimized
        on its own (IO adapts the weights to one pair), and batching only groups the reads. On
        CUDA each batch is staged in pinned (page-locked) host memory and copied to the GPU
        asynchronously.

        Args:
            pairs: an iterable (a generator too) of ``(fixed, moving)`` tuples or of mappings with
                keys ``fixed``, ``moving`` and optionally ``fixed_mask``, ``moving_mask``; each
                image as for :func:`mgr_engine.register` (a path, an ``itk.Image``, ...). Relative
                paths are taken from the working directory at this call.
            batch_size: pairs per network forward without IO (with ``compile=True`` a last,
                smaller batch compiles once more).
            prefetch: batches prepared ahead (host memory: two float32 volumes of the network's
                input shape per pair, 43 MB at 175^3).
            on_error: ``"raise"`` or ``"yield"``, see below.
            Other arguments: as :func:`mgr_engine.register`, the same for every pair.

        A pair that cannot be registered (an image that cannot be read or is not a volume, a bad
        mask, instance optimization that diverged) raises its typed error (see
        :mod:`mgr_engine.errors`), its message starting with the pair's index; the results
        yielded before stay valid. With ``on_error="yield"`` that error (an exception object,
        not raised) is yielded in the pair's place instead and the stream goes on: a data set's
        one corrupt file does not stop a night's run. Errors that are not a pair's own (the
        ``pairs`` iterable failing, the device) are raised either way.
        Closing the generator early stops the reading thread. Consecutive pairs with the same
        fixed file (and fixed mask file) read and preprocess it once, and their results share
        its ``itk.Image``: a data set registered to one atlas reads the atlas once. The same file
        is the same file under any path (relative, absolute, a link); one rewritten between pairs
        (another size or modification time; for a DICOM folder, of any of its files) is read again.
        """
        if not (_is_count(batch_size) and _is_count(prefetch)):
            raise InvalidOptionError(f"batch_size and prefetch must be whole numbers of at least 1, got {batch_size!r} "
                                     f"and {prefetch!r}")
        if on_error not in ("raise", "yield"):
            raise InvalidOptionError(f"on_error must be 'raise' or 'yield', got {on_error!r}")
        self._check_options(fixed_modality=fixed_modality, moving_modality=moving_modality, io_iterations=io_iterations,
                            io_sim=io_sim, io_lr=io_lr, io_precision=io_precision, masking=masking, ct_window=ct_window,
                            quantile_range=quantile_range, seed=seed, match_orientation=match_orientation)

        fixed_cache = {}  # pairs with one fixed file (an atlas) read and preprocess it once
        # Relative paths are taken from the directory of this call, in this thread: ITK's lazy
        # loader changes the process's working directory while it loads a module, so a thread
        # opening a relative path meanwhile misses it. Its first load (numpy views of images) is
        # made here, before the reading thread starts.
        cwd = os.getcwd()
        itk_io.load_array_views()

        def prepare(index, item):
            fixed, moving, masks = _unpack_pair(index, item, cwd)
            try:
                return self._prepare_pair(fixed, moving, fixed_modality=fixed_modality, moving_modality=moving_modality,
                                          masking=masking, io_iterations=io_iterations, ct_window=ct_window,
                                          quantile_range=quantile_range, match_orientation=match_orientation,
                                          fixed_cache=fixed_cache, **masks)
            except MgrEngineError as error:
                raise _named_for_pair(error, index)  # caused by error

        io = dict(io_iterations=io_iterations, io_sim=io_sim, io_lr=io_lr, io_precision=io_precision, progress=progress,
                  seed=seed) if io_iterations else None
        # A generator of its own, so that the checks above raise at the call, not at the first result.
        yield_errors = on_error == "yield"
        return self._registered_stream(_prefetched_batches(pairs, prepare, batch_size, prefetch, pin=(
            self.device.type == "cuda" and self.backend == "torch"), yield_errors=yield_errors), io, yield_errors)

    def _registered_stream(self, batches, io, yield_errors: bool):
        """The results of :meth:`register_many` for prepared ``batches`` (a pair's error in place
        of a batch, where they are yielded); ``io``: IO's options or None; ``yield_errors``: IO's
        errors yielded in the pair's place too."""
        with contextlib.closing(batches):
            for batch in batches:
                if isinstance(batch, _PairError):
                    yield batch.error
                    continue
                if io is not None:
                    for pair in batch.pairs:
                        try:
                            result = self._optimize_pair(pair, **io)
                        except MgrEngineError as error:
                            result = _named_for_pair(error, pair.index)
                            if not yield_errors:
                                raise result
                        yield result
                    continue
                pinned = batch.moving.is_pinned()
                phi_ab = self.predict_map(batch.moving.to(self.device, non_blocking=pinned),
                                          batch.fixed.to(self.device, non_blocking=pinned)).cpu()
                for k, pair in enumerate(batch.pairs):
                    yield self._result(pair, phi_ab[k:k + 1])


@dataclass
class _PreparedPair:
    """A pair read, checked and preprocessed: the ITK images, the network inputs
    (1, 1, *input_shape) in [0, 1], and IO's loss masks on the network grid (or None)."""

    fixed_image: object
    moving_image: object
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_loss_mask: torch.Tensor | None = None
    moving_loss_mask: torch.Tensor | None = None
    moving_grid_as_given: object = None  # where match_orientation reordered the moving image: its grid before
    index: int | None = None  # in register_many's pairs


@dataclass
class _Batch:
    """Prepared pairs and their network inputs stacked (B, 1, *input_shape), pinned on CUDA."""

    pairs: list
    moving: torch.Tensor
    fixed: torch.Tensor


@dataclass
class _PairError:
    """A pair's error in :func:`_prefetched_batches`' stream, where pair errors are yielded."""

    error: MgrEngineError


def _named_for_pair(error: MgrEngineError, index) -> MgrEngineError:
    """``error`` again (its type, caused by it: a yielded error keeps its traceback), its message
    starting with the pair's index in register_many's pairs."""
    message = str(error)
    if index is None or message.startswith(f"pair {index}: "):
        return error
    return with_message(error, f"pair {index}: {message}")


def _unpack_pair(index, item, cwd: str):
    """``(fixed, moving, masks)`` of one element of :meth:`Engine.register_many`'s ``pairs``,
    relative paths joined to ``cwd``."""
    if isinstance(item, dict):
        unknown = set(item) - {"fixed", "moving", "fixed_mask", "moving_mask"}
        if unknown or not {"fixed", "moving"} <= set(item):
            raise InvalidOptionError(f"pair {index}: a mapping needs the keys 'fixed' and 'moving' (and optionally "
                                     f"'fixed_mask', 'moving_mask'); got {sorted(item)}")
        fixed, moving = item["fixed"], item["moving"]
        masks = {key: item.get(key) for key in ("fixed_mask", "moving_mask")}
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        (fixed, moving), masks = item, {"fixed_mask": None, "moving_mask": None}
    else:
        raise InvalidOptionError(f"pair {index}: expected a (fixed, moving) tuple or a mapping with 'fixed' and "
                                 f"'moving', got {type(item).__name__}")

    def absolute(value):
        if isinstance(value, (str, os.PathLike)) and not os.path.isabs(value):
            return os.path.join(cwd, value)
        return value

    return absolute(fixed), absolute(moving), {key: absolute(value) for key, value in masks.items()}


def _files_key(image, mask):
    """What identifies an image given as a file, with its mask (a file or None): the file itself
    (device and inode, so that a relative and an absolute path, or a link, name one file) and its
    size and modification time, so that a file rewritten between pairs is read again. None where
    either is an object in memory, which its owner may change between pairs, or cannot be found
    (its reader raises the error). A folder (a DICOM series) is identified with its files: one of
    them rewritten in place leaves the folder's own modification time as it was; a header (Analyze
    ``.hdr``, MetaImage ``.mhd``) with the file of its voxels, which can be rewritten alone, and a
    DICOM file with the files of its folder (its series is read, :func:`itk_io.companion_files`)."""
    if not isinstance(image, (str, os.PathLike)) or not (mask is None or isinstance(mask, (str, os.PathLike))):
        return None
    try:
        return tuple(_file_key(path) for path in (image, mask) if path is not None)
    except OSError:
        return None


def _file_key(path) -> tuple:
    info = os.stat(path)
    files = ((file.name, file.stat()) for file in itk_io.image_files(path))  # a folder's, a header's data file
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns) + tuple(
        (name, file.st_ino, file.st_size, file.st_mtime_ns) for name, file in files)


_END = object()


def _prefetched_batches(pairs, prepare, batch_size: int, prefetch: int, pin: bool, yield_errors: bool = False):
    """Batches of ``prepare(index, item)`` for the items of ``pairs``, made by a background thread
    at most ``prefetch`` batches ahead. An error is raised here after the batch of the pairs
    before it; with ``yield_errors`` a pair's own error (a :class:`MgrEngineError` of ``prepare``)
    comes as a :class:`_PairError` in its place instead, and the pairs after it go on. Leaving
    the generator stops the thread."""
    ready = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def batch_of(prepared):
        moving = torch.cat([p.moving for p in prepared])
        fixed = torch.cat([p.fixed for p in prepared])
        if pin:  # page-locked: the copy to the GPU runs asynchronously, at full bus speed
            moving, fixed = moving.pin_memory(), fixed.pin_memory()
        return _Batch(prepared, moving, fixed)

    def load():
        prepared, last = [], _END
        try:
            for index, item in enumerate(pairs):
                if stop.is_set():
                    return
                try:
                    pair = prepare(index, item)
                except MgrEngineError as error:
                    if not yield_errors:
                        raise
                    if prepared and not put(batch_of(prepared)):  # in order: the pairs before it first
                        return
                    prepared = []
                    if not put(_PairError(error)):
                        return
                    continue
                pair.index = index
                prepared.append(pair)
                if len(prepared) == batch_size:
                    if not put(batch_of(prepared)):
                        return
                    prepared = []
        except BaseException as error:  # handed to the consumer, after the pairs before it
            last = error
        if prepared and not put(batch_of(prepared)):
            return
        put(last)

    thread = threading.Thread(target=load, name="mgr_engine-loader", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass
class RegistrationResult:
    """What :func:`mgr_engine.register` returns; also made from a map of :meth:`Engine.predict_map`
    and the two images it was computed from, ``RegistrationResult(fixed, moving, phi_ab)``, for
    its transform, warp and the rest in mm (``phi_ba``, the backward map, for its inverse).

    ``phi_ab``: the map moving <- fixed on the network grid ((1, 3, *input_shape), [0, 1]
    coordinates); ``io_losses``: the loss of each IO step (empty without IO); ``device``: where
    :meth:`warp` and :meth:`displacement_field` compute (the engine's device). Everything else
    is in ITK's conventions and physical units (mm).
    """

    fixed: object
    moving: object
    phi_ab: torch.Tensor
    phi_ba: torch.Tensor | None = None
    io_losses: list = field(default_factory=list)
    device: torch.device = torch.device("cpu")
    _inverse: object = None
    _cache: dict = field(default_factory=dict, repr=False)
    # The moving image's grid as the caller gave it, where match_orientation reordered ``moving``:
    # an array of the moving image (labels to warp) lies on it, not on the reordered copy's.
    _moving_grid_as_given: object = None

    def __post_init__(self):
        # A result made by hand from predict_map's maps: a batch's map would have been cut to its
        # first pair's without a word (the transform takes phi[0]); the images as register takes them.
        for name in ("phi_ab", "phi_ba"):
            phi = getattr(self, name)
            one_map = isinstance(phi, torch.Tensor) and phi.dim() == 5 and tuple(phi.shape[:2]) == (1, 3)
            if phi is not None and not one_map:
                raise InvalidImageError(
                    f"{name} must be one pair's map, a (1, 3, D, H, W) tensor as Engine.predict_map gives for one "
                    f"pair (phi[k:k + 1] of a batch's), got {tuple(getattr(phi, 'shape', ())) or type(phi).__name__}")
        for name in ("fixed", "moving"):
            if not hasattr(getattr(self, name), "GetLargestPossibleRegion"):
                setattr(self, name, itk_io.load_image(getattr(self, name), name))

    @property
    def transform(self):
        """``itk.CompositeTransform`` mapping fixed-space points to moving-space points (mm);
        use it to resample the moving image onto the fixed grid."""
        if "transform" not in self._cache:
            self._cache["transform"] = itk_io.map_to_transform(self.phi_ab[0].numpy(), self.moving, self.fixed)
        return self._cache["transform"]

    @property
    def inverse_transform(self):
        """``itk.CompositeTransform`` mapping moving-space points to fixed-space points (mm).

        The network's backward map (computed on first access when IO did not compute it)."""
        if "inverse" not in self._cache:
            if self.phi_ba is None:
                if self._inverse is None:
                    raise MgrEngineError("this result has no inverse map and no engine to compute it (it was "
                                         "made from a map, or copied or pickled without its engine): give it "
                                         "phi_ba (Engine.predict_map(fixed, moving)), read inverse_transform before "
                                         "copying, or register with instance optimization, which computes both maps.")
                self.phi_ba = self._inverse().cpu()
            self._cache["inverse"] = itk_io.map_to_transform(self.phi_ba[0].numpy(), self.fixed, self.moving)
        return self._cache["inverse"]

    def __getstate__(self):
        """For pickle and copy (a process pool's results, a cache on disk): the maps and images,
        without the engine (locks, a network) that would compute the inverse map on demand, and
        without the outputs computed so far (ITK transforms), which are computed again."""
        return {**self.__dict__, "_inverse": None, "_cache": {}}

    def _moving_arrays_grid(self):
        """The grid an array of the moving image's shape lies on: the moving image's as given."""
        return self.moving if self._moving_grid_as_given is None else self._moving_grid_as_given

    def _grid_transform(self) -> resample.GridTransform:
        """:attr:`transform` as arrays, what the engine evaluates it with: the same numbers ITK's
        transform holds (its displacement field's own buffer, not a copy)."""
        return itk_io.grid_transform(self.transform)

    def warp(self, image=None, interpolation: str = "linear"):
        """``image`` (default: the moving image; any image in moving space; an array of the moving
        image's shape lies on its grid as given, before ``match_orientation``'s reordering)
        resampled onto the fixed grid through :attr:`transform`; ``interpolation`` is ``"linear"``
        or ``"nearest"`` (for label maps: a label map warped linearly is warned of). Keeps the
        pixel type; 0 outside the image.

        What ``itk.ResampleImageFilter`` computes through :attr:`transform` (an integer type
        truncated, as ITK does), evaluated on the engine's device (:func:`mgr_engine.itk_io.warp_image`)."""
        if image is None:
            image = self.moving
        else:
            image = itk_io.load_image(image, "image to warp", on_grid_of=self._moving_arrays_grid())
            warn_if_linear_on_labels(image, interpolation)
        return itk_io.warp_image(self._grid_transform(), image, self.fixed, interpolation, self.device)

    def displacement_field(self):
        """Dense displacement field on the fixed grid: an ITK vector image (float32) of physical
        displacements (mm), ``transform(p) - p``; writable as ``.nii.gz`` for ANTs.

        What ``itk.TransformToDisplacementFieldFilter`` computes from :attr:`transform`,
        evaluated on the engine's device (:func:`mgr_engine.itk_io.grid_displacement_field`).
        Computed once (kept for :meth:`jacobian_determinant`)."""
        if "displacement_field" not in self._cache:
            self._cache["displacement_field"] = itk_io.grid_displacement_field(self._grid_transform(), self.fixed,
                                                                               self.device)
        return self._cache["displacement_field"]

    def jacobian_determinant(self, physical: bool = False):
        """Jacobian determinant of :attr:`transform` on the fixed grid (float image); values
        below 0 mark folds.

        Default: ITK's ``DisplacementFieldJacobianDeterminantFilter`` of :meth:`displacement_field`
        (as ``mgr-engine jacobian`` and ``unigradicon-jacobian``: derivatives along the fixed
        image's index axes, its direction not applied), bit for bit on x86-64, computed on the
        engine's device (:func:`mgr_engine.resample.jacobian_determinant`; on the CPU a C++ kernel,
        :mod:`mgr_engine.kernels.jacobian_cpu`).

        ``physical=True``: derivatives along the physical axes (the fixed image's direction
        applied), the determinant of the transform's Jacobian, i.e. the local volume change. It
        differs from the default only on oblique images, where the default is not that.

        From :meth:`displacement_field` where it was computed; otherwise slab by slab, without
        the whole field (:func:`mgr_engine.itk_io.grid_jacobian_determinant`)."""
        check_flag(physical, "physical")
        if "displacement_field" in self._cache:
            return itk_io.jacobian_determinant(self._cache["displacement_field"], physical, self.device)
        return itk_io.grid_jacobian_determinant(self._grid_transform(), self.fixed, physical, self.device)

    def transform_points(self, points, inverse: bool = False):
        """(N, 3) points (x, y, z, mm, ITK's LPS) through :attr:`transform`: fixed-space points,
        such as the fixed image's landmarks, -> their moving-space points, as ITK's
        ``TransformPoint`` maps each, all at once (:func:`mgr_engine.points.transform_points`).
        ``inverse=True``: moving-space points -> fixed-space points, through
        :attr:`inverse_transform`. Points files: :func:`mgr_engine.read_points`."""
        from .points import transform_points

        check_flag(inverse, "inverse")
        return transform_points(self.inverse_transform if inverse else self.transform, points)

    def dice(self, fixed_labels, moving_labels):
        """``(before, after)``: the Dice overlap of each label of ``fixed_labels`` (a segmentation of
        the fixed image, on its grid) with ``moving_labels`` (the moving image's, warped onto the fixed
        grid by :meth:`warp`, nearest neighbour), each a ``{label: dice}`` dict; ``before`` through
        the identity in physical space. Paths or ``itk.Image``s, or arrays on the fixed and moving
        images' grids (:func:`mgr_engine.labels.dice_before_and_after`)."""
        from .labels import dice_before_and_after

        fixed_labels = itk_io.load_image(fixed_labels, "fixed labels", on_grid_of=self.fixed)
        itk_io.check_same_grid(fixed_labels, self.fixed, "fixed labels")
        moving_labels = itk_io.load_image(moving_labels, "moving labels", on_grid_of=self._moving_arrays_grid())
        return dice_before_and_after(fixed_labels, moving_labels, self.warp(moving_labels, "nearest"))

    def save(self, transform_path) -> None:
        """Write :attr:`transform` (``.h5`` or ``.tfm``, readable by ``itk.transformread``) atomically;
        :class:`OutputWriteError` where it cannot be, its name checked before the transform is built."""
        itk_io.check_output_path(transform_path, "transform")
        itk_io.write_transform(self.transform, transform_path)


_ENGINE_CACHE = {}  # settings -> (their files' versions, Engine): the two used last, the latest last


def _cached_engine(model, weights, device, backend="torch", onnx_model=None):
    """The engine of these settings, made again where its checkpoint (or ONNX model) file was
    rewritten since: keyed by the path alone, a checkpoint retrained or copied over the old one
    at the same path went on being served from memory."""
    settings = (model, weights, device, backend, onnx_model)
    # _file_key, as an image file's: a missing ONNX model is left for the engine's typed error
    onnx_version = _file_key(onnx_model) if onnx_model is not None and Path(onnx_model).exists() else None
    versions = (_file_key(resolve_weights(model, weights)), onnx_version)
    versions_and_engine = _ENGINE_CACHE.pop(settings, None)
    if versions_and_engine is None or versions_and_engine[0] != versions:
        versions_and_engine = None  # an outdated engine's memory is free before the new one loads
        versions_and_engine = versions, Engine(model=model, weights=weights, device=device, backend=backend,
                                               onnx_model=onnx_model)
    _ENGINE_CACHE[settings] = versions_and_engine
    while len(_ENGINE_CACHE) > 2:
        del _ENGINE_CACHE[next(iter(_ENGINE_CACHE))]
    return versions_and_engine[1]


def register_many(pairs, *, model: str = "multigradicon", weights=None, device=None, batch_size: int = 1,
                  prefetch: int = 2, backend: str = "torch", onnx_model=None, **options):
    """Register a stream of pairs with one cached engine: a generator of :class:`RegistrationResult`
    in the order of ``pairs``, the next pairs read while the network works (see
    :meth:`Engine.register_many` for ``pairs``, ``batch_size`` and ``prefetch``).

    ``model``, ``weights``, ``device``, ``backend``, ``onnx_model``: as :func:`register`;
    ``options``: :func:`register`'s other keyword arguments, the same for every pair, and
    ``on_error`` (``"yield"``: a bad pair's error in its place, see :meth:`Engine.register_many`). ::

        pairs = [(f"fixed_{i}.nii.gz", f"moving_{i}.nii.gz") for i in range(100)]
        for i, result in enumerate(mgr_engine.register_many(pairs, io_iterations=None, batch_size=4)):
            result.save(f"transform_{i}.h5")
    """
    return _engine_for(model, weights, device, backend, onnx_model).register_many(
        pairs, batch_size=batch_size, prefetch=prefetch, **options)


def _engine_for(model, weights, device, backend, onnx_model) -> Engine:
    """The cached engine of these settings (a state dict as ``weights``: a new engine)."""
    check_model(model)
    if weights is not None:
        _check_weights_type(weights)
    if isinstance(weights, dict):  # a state dict: not cacheable
        return Engine(model=model, weights=weights, device=device, backend=backend, onnx_model=onnx_model)
    with _ENGINE_CACHE_LOCK:  # threads' first calls at once would each load the weights
        # and ITK's module of array views, which register() needs, before threads read images:
        # loading it changes the process's working directory (see itk_io.load_array_views)
        itk_io.load_array_views()
        return _cached_engine(model, None if weights is None else str(weights),
                              None if device is None else str(device), backend,
                              None if onnx_model is None else str(onnx_model))


_ENGINE_CACHE_LOCK = threading.Lock()


def register(fixed, moving, *, fixed_modality: str = "mri", moving_modality: str = "mri",
             model: str = "multigradicon", weights=None, io_iterations: int | None = 50, io_sim: str = "lncc2",
             io_lr: float = 2e-5, io_precision: str = "fp32", fixed_mask=None, moving_mask=None, masking: str = "loss",
             ct_window=None, quantile_range=None, device=None, progress: bool = True,
             seed: int | None = None, backend: str = "torch", onnx_model=None,
             match_orientation: bool = False) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with multiGradICON (or uniGradICON).

    Args:
        fixed, moving: a path (NIfTI, NRRD, MHA, anything ITK reads, or a folder of one DICOM
            series), an ``itk.Image``, a ``SimpleITK.Image``, a nibabel image (``nibabel.load``'s:
            the grid ITK reads from its file), or a numpy array or torch tensor (axes z, y, x; then
            1 mm spacing, zero origin, identity direction; a tensor is copied to the host).
            Spacing, origin and direction (oblique included) are honoured.
        fixed_modality, moving_modality: ``"mri"`` (clip to [min, 99th percentile]) or ``"ct"``
            (clip to [-1000, 1000] HU), then scale to [0, 1].
        model: ``"multigradicon"``, ``"unigradicon"`` or ``"compact"`` (the bundled compact model).
        weights: checkpoint path, or a state dict (tensors or NumPy arrays; not cached); default
            ``$MGR_ENGINE_WEIGHTS_DIR/<model>1.0/Step_2_final.trch`` or the user cache directory
            (see :func:`weights_search_path`).
        io_iterations: instance-optimization steps (Adam on the network weights); ``None`` or
            ``0`` for none.
        io_sim: IO similarity, ``"lncc2"`` (1 - LNCC^2), ``"lncc"`` (1 - LNCC) or ``"mind"`` (MIND-SSC).
        io_lr: IO learning rate.
        io_precision: arithmetic of IO's convolutions on CUDA (no effect on the CPU): ``"fp32"``
            (default), ``"tf32"`` (TF32 tensor cores; steps 3.9x faster than fp32 on an H200,
            rounding operands to 10 bits) or ``"tf32x3"`` (three TF32 products per convolution,
            float32's accuracy); see :meth:`Engine.instance_optimize`.
        fixed_mask, moving_mask: binary masks on the images' grids (paths, images or arrays): 0
            outside, a positive whole number inside (labels too); fractions (a probability map),
            negative values, an empty mask or (loss masking) one the network grid misses
            raise :class:`InvalidImageError`.
        masking: ``"loss"`` (similarity only inside the masks, needs IO), ``"input"`` (zero the
            images outside the masks before the network) or ``"both"``.
        ct_window: (min, max) HU window for CT images; quantile_range: (low, high) quantiles for MRI,
            between 0 and 1 (``(0.01, 0.99)``: the 1st and 99th percentiles). Checked before any
            image is read.
        device: torch device, default CUDA when available.
        progress: show a progress bar during IO.
        seed: seeds the GradICON regularizer's random grid, for reproducible IO: drawn on the
            CPU as the reference draws it (its losses reproduce the reference's). Without a
            seed, on a GPU, the grid is drawn there (no host work in each IO step).
        backend: ``"torch"`` or ``"onnxruntime"`` (the network's forward in ONNX Runtime; IO stays
            in PyTorch). onnx_model: its graph, see :class:`Engine`.
        match_orientation: the network compares the two volumes voxel axis by voxel axis, as
            stored; where their axes point in different anatomical directions (say a DICOM
            series stored LPS and a NIfTI file stored RAS) it sees the moving anatomy flipped or
            turned, and a warning says so. ``True`` first reorders the moving image's voxels
            onto the fixed image's axes (each voxel keeps its physical position; the result's
            ``moving`` is that copy, while arrays given to its ``warp`` and ``dice`` still lie on
            the moving image's grid as given), as the reference does not: off by default.

    Returns:
        :class:`RegistrationResult` with ``transform`` (fixed point -> moving point),
        ``inverse_transform``, ``warp()``, ``displacement_field()``, ``jacobian_determinant()``
        and ``save()``. The engine is cached, so repeated calls do not reload the weights
        (unless the checkpoint file was written again since: its size and modification time are
        compared); use :class:`Engine` to control its lifetime. Threads share the cached engine; their IO
        runs one call at a time (see :meth:`Engine.instance_optimize`).
    """
    return _engine_for(model, weights, device, backend, onnx_model).register(
        fixed, moving, fixed_modality=fixed_modality, moving_modality=moving_modality,
        io_iterations=io_iterations, io_sim=io_sim, io_lr=io_lr, io_precision=io_precision, fixed_mask=fixed_mask,
        moving_mask=moving_mask, masking=masking, ct_window=ct_window, quantile_range=quantile_range,
        progress=progress, seed=seed, match_orientation=match_orientation)
