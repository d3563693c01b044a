"""Training with the multiGradICON recipe (paper, sections 3.2-3.3) on synthetic patients.

Objective (eq. 4): per pair of patients (A, B), one random contrast of each as the network's
input and one for the similarity loss,

    sim(A_L o Phi[A, B], B_L) + sim(B_L o Phi[B, A], A_L) + lambda * GradICON,

with ``sim = 1 - LNCC^2`` and lambda = 1.5 (:func:`mgr_engine.engine.gradicon_objective`).
How the loss contrasts are drawn (:func:`choose_contrasts`) is the paper's variant:

* ``B`` (baseline): the loss compares the input images themselves;
* ``F``: one random contrast, the same for both patients, for the loss;
* ``R``: a random contrast of each patient for the loss, independently;
* ``mono``: monomodal pairs only (input and loss share one contrast), uniGradICON-style,
  for the ablation of issue 5.

Augmentation (:func:`augment`) is the authors' (``training/train_multi.py``): per pair, a
random permutation of the axes with random signs (flips), the same for both images, times
identity + 0.05 N(0, 1) on the 3x4 affine, drawn separately for each image; an image and
its loss image share the transform. 1-CT inversion (paper, section 3.3): with ``ct`` brain
patients also have a CT-like contrast and its inversion 1 - CT (:data:`synth.CT_CONTRASTS`),
drawn like any other contrast; off by default (the bundled model was trained without).

BatchNorm: icon_registration's training loops keep the network in train mode for every
optimization step (``net.train()``; ``eval()`` only around the periodic visualization), so
BatchNorm normalizes with batch statistics and updates its running statistics (momentum
0.1) on each of the two forward passes (A->B and B->A) per step; inference then uses the
running statistics. :func:`train` does the same: ``network.train()`` for the steps,
``eval()`` for its held-out evaluation.

Two stages as the reference (``train_two_stage``): until ``last_unet_from`` the network runs
without its last U-Net (Psi4, displacement zero), then Psi4 joins, starting from its
zero (identity) initialization, with a fresh Adam optimizer as the reference creates one.

State lives in ``RUN_DIR``: ``checkpoint.pt`` (network, optimizer, step, configuration and
the random generator, written atomically every ``save_every`` steps and at the end), so a
later session resumes exactly where this one stopped; ``compact.safetensors`` (the weights in
the engine's format, see :func:`export_weights`); ``log.jsonl`` (one line per logged step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import synth
from .engine import COMPACT_CONFIG, gradicon_objective, resolve_device
from .errors import InvalidOptionError, OutputWriteError
from .losses import similarity_by_name
from .model import GradICONNetwork, NetworkConfig, load_official_state_dict, read_safetensors, save_safetensors
from .ops import network_memory_format

log = logging.getLogger("mgr_engine.train")

VARIANTS = ("B", "F", "R", "mono")
CHECKPOINT_FILE = "checkpoint.pt"
WEIGHTS_FILE = "compact.safetensors"
LOG_FILE = "log.jsonl"
# Preprocessing the synthetic images went through (synth.normalize_mri): stored with the weights.
PREPROCESSING = {"mri_quantile_range": [0.0, 0.99], "ct_window": [-1000.0, 1000.0]}
# Options that may change when a run resumes; every other one defines the run. A new ``lr``
# applies from the resumed step on (a hand-made schedule: lower it for the last steps).
RESUMABLE_OPTIONS = ("steps", "lr", "save_every", "log_every", "eval_every", "eval_pairs")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in its checkpoint).

    ``lr`` 5e-5 and the 4 x 4 = 16 pairs per step of the reference are for GPUs; ``amp``
    runs the U-Nets in bfloat16 autocast (maps, warps and losses stay float32).
    """

    input_shape: tuple = COMPACT_CONFIG.input_shape
    down_channels: tuple = COMPACT_CONFIG.down_channels
    up_channels: tuple = COMPACT_CONFIG.up_channels
    steps: int = 20000
    last_unet_from: int = 0
    batch_size: int = 4
    lr: float = 5e-5
    lmbda: float = 1.5
    similarity: str = "lncc2"
    variant: str = "R"
    shapes_fraction: float = 0.25
    ct: bool = False
    augment: bool = True
    affine_noise: float = 0.05
    amp: bool = False
    seed: int = 0
    save_every: int = 200
    log_every: int = 10
    eval_every: int = 0
    eval_pairs: int = 2

    def network_config(self) -> NetworkConfig:
        return NetworkConfig(tuple(self.input_shape), tuple(self.down_channels), tuple(self.up_channels))

    def check(self) -> "TrainConfig":
        """Raise :class:`InvalidOptionError` for an option out of range; return self."""
        if self.variant not in VARIANTS:
            raise InvalidOptionError(f"unknown randomization variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        similarity_by_name(self.similarity)
        # each option by name (save_every and log_every of 0 were a ZeroDivisionError at the first step)
        ranges = {"steps": (self.steps >= 0, ">= 0"), "last_unet_from": (self.last_unet_from >= 0, ">= 0"),
                  "batch_size": (self.batch_size >= 1, ">= 1"), "lr": (self.lr > 0, "> 0"),
                  "lmbda": (self.lmbda >= 0, ">= 0"), "shapes_fraction": (0 <= self.shapes_fraction <= 1, "in [0, 1]"),
                  "affine_noise": (self.affine_noise >= 0, ">= 0"), "save_every": (self.save_every >= 1, ">= 1"),
                  "log_every": (self.log_every >= 1, ">= 1"), "eval_every": (self.eval_every >= 0, ">= 0 (0: never)"),
                  "eval_pairs": (self.eval_pairs >= 1 or not self.eval_every, ">= 1 where eval_every > 0")}
        bad = [f"{name} {getattr(self, name)!r} (needs {bound})" for name, (ok, bound) in ranges.items() if not ok]
        if bad:
            raise InvalidOptionError(f"training options out of range: {'; '.join(bad)}")
        self.network_config()  # channels and input shape, checked by NetworkConfig
        return self


# ---------------------------------------------------------------- data

def choose_contrasts(variant: str, contrasts, gen: torch.Generator):
    """``(input_a, input_b, loss_a, loss_b)``: contrast names for one pair of patients that
    both have ``contrasts``, drawn uniformly by ``variant`` (see the module docstring)."""
    def pick():
        return contrasts[int(torch.randint(len(contrasts), (), generator=gen))]

    if variant == "mono":
        name = pick()
        return name, name, name, name
    input_a, input_b = pick(), pick()
    if variant == "B":
        return input_a, input_b, input_a, input_b
    if variant == "F":
        name = pick()
        return input_a, input_b, name, name
    if variant == "R":
        return input_a, input_b, pick(), pick()
    raise InvalidOptionError(f"unknown randomization variant {variant!r}: choose one of {', '.join(VARIANTS)}")


def random_axis_flips(gen: torch.Generator) -> torch.Tensor:
    """(3, 4) affine without translation: a random permutation of the axes with random signs."""
    matrix = torch.zeros(3, 4)
    permutation = torch.randperm(3, generator=gen)
    signs = torch.randint(0, 2, (3,), generator=gen) * 2 - 1
    matrix[torch.arange(3), permutation] = signs.float()
    return matrix


def augment(images_a: torch.Tensor, images_b: torch.Tensor, gen: torch.Generator, noise: float = 0.05):
    """The authors' affine augmentation for a batch of pairs (``(B, C, D, H, W)`` each; the
    channels of one side, network input and loss image, share their transform): per pair one
    random axis permutation with flips for both sides, plus ``noise`` N(0, 1) on each side's
    3x4 affine (normalized coordinates), resampled trilinearly with border padding."""
    batch = images_a.shape[0]
    base = torch.stack([random_axis_flips(gen) for _ in range(batch)])
    out = []
    for images in (images_a, images_b):
        theta = (base + noise * torch.randn(base.shape, generator=gen)).to(images.device, images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out.append(F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False))
    return out[0], out[1]


def make_batch(config: TrainConfig, gen: torch.Generator, device=None) -> dict:
    """One training batch: ``moving``/``fixed`` network inputs and ``loss_moving``/``loss_fixed``
    images, each (batch_size, 1, *input_shape), plus the contrasts drawn (``contrasts``)."""
    shape = tuple(config.input_shape)
    columns = {"moving": [], "fixed": [], "loss_moving": [], "loss_fixed": []}
    drawn = []
    for _ in range(config.batch_size):
        patient_a, patient_b = synth.training_pair(gen, shape, shapes_fraction=config.shapes_fraction, device=device,
                                                   ct=config.ct)
        names = choose_contrasts(config.variant, patient_a.contrasts, gen)
        drawn.append((patient_a.kind, *names))
        columns["moving"].append(patient_a.image(names[0]))
        columns["fixed"].append(patient_b.image(names[1]))
        columns["loss_moving"].append(patient_a.image(names[2]))
        columns["loss_fixed"].append(patient_b.image(names[3]))
    batch = {key: torch.cat(value) for key, value in columns.items()}
    if config.augment:
        side_a = torch.cat([batch["moving"], batch["loss_moving"]], 1)
        side_b = torch.cat([batch["fixed"], batch["loss_fixed"]], 1)
        side_a, side_b = augment(side_a, side_b, gen, config.affine_noise)
        batch.update(moving=side_a[:, :1], loss_moving=side_a[:, 1:], fixed=side_b[:, :1], loss_fixed=side_b[:, 1:])
    batch["contrasts"] = drawn
    return batch


# ---------------------------------------------------------------- one step

def training_step(network: GradICONNetwork, optimizer, batch: dict, config: TrainConfig, gen: torch.Generator) -> dict:
    """One optimization step on ``batch`` (network in train mode); returns the loss terms."""
    network.train()
    similarity = similarity_by_name(config.similarity)
    terms = []

    def recorded(image, target, mask=None):
        value = similarity(image, target, mask)
        terms.append(value.detach())
        return value

    optimizer.zero_grad(set_to_none=True)
    loss, _, _ = gradicon_objective(
        network, batch["moving"], batch["fixed"], recorded, lmbda=config.lmbda, generator=gen,
        loss_moving=batch["loss_moving"], loss_fixed=batch["loss_fixed"])
    loss.backward()
    optimizer.step()
    total, similarity_loss = loss.item(), float(sum(terms))
    return {"loss": total, "similarity": similarity_loss, "gradicon": (total - similarity_loss) / config.lmbda}


# ---------------------------------------------------------------- checkpoints

def _atomic_save(obj, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def save_checkpoint(run_dir, *, network, optimizer, config: TrainConfig, step: int, gen: torch.Generator) -> Path:
    """Write ``RUN_DIR/checkpoint.pt``: everything :func:`train` needs to resume at ``step``."""
    path = Path(run_dir) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "config": dataclasses.asdict(config), "step": step,
        "network": network.state_dict(), "optimizer": optimizer.state_dict(),
        "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    _atomic_save(state, path)
    return path


def load_checkpoint_state(run_dir) -> dict | None:
    """The checkpoint of ``run_dir`` (a dict, tensors on the CPU), or None when there is none."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def export_weights(network: GradICONNetwork, path, *, config: TrainConfig | None = None, step: int | None = None) -> Path:
    """Write the weights as the engine loads them (``Engine(model="compact", weights=path)``):
    safetensors, official key names, float16 convolutions, the NetworkConfig, the
    preprocessing the training images had, and a summary of the training run."""
    metadata = {"preprocessing": json.dumps(PREPROCESSING)}
    if config is not None:
        metadata["training"] = json.dumps({**dataclasses.asdict(config), "step": step})
    return save_safetensors(network, path, metadata=metadata)


# ---------------------------------------------------------------- evaluation

def warp_labels(labels: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Label map (D, H, W) pulled back through the map ``phi`` (1, 3, D, H, W) (nearest neighbour;
    outside the grid: 0)."""
    grid = phi.flip(1).permute(0, 2, 3, 4, 1) * 2.0 - 1.0
    warped = F.grid_sample(labels[None, None].float(), grid.float(), mode="nearest", padding_mode="zeros",
                           align_corners=True)
    return warped[0, 0].round().to(labels.dtype)


def dice(a, b, label: int) -> float:
    """Dice overlap of ``label`` in two label maps, tensors or arrays (1.0 when both lack it)."""
    x, y = a == label, b == label
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * int((x & y).sum()) / total


def negative_jacobian_percent(phi: torch.Tensor) -> float:
    """Percentage of grid points where the map ``phi`` (1, 3, D, H, W; [0, 1] coordinates) has
    a negative Jacobian determinant (central differences in voxel units)."""
    shape = phi.shape[2:]
    voxels = phi[0].double() * torch.tensor([n - 1 for n in shape], dtype=torch.float64).view(3, 1, 1, 1)
    rows = [torch.stack(torch.gradient(voxels[c]), 0) for c in range(3)]  # d phi_c / d x_k
    jacobian = torch.stack(rows, 0).permute(2, 3, 4, 0, 1)
    return 100.0 * float((torch.linalg.det(jacobian) < 0).double().mean())


def evaluate_pairs(predict, pairs, contrast_pairs, labels=(1, 2, 3)) -> dict:
    """Dice per label before/after and % negative Jacobian on ``pairs`` of patients.

    ``predict(moving, fixed) -> phi``: maps moving <- fixed, (1, 3, *shape);
    ``contrast_pairs``: e.g. ``[("t1", "t2")]`` (moving contrast, fixed contrast).
    Returns ``{"t1/t2": {"before": {label: mean dice}, "after": {...}, "negative_jacobian": %}}``.
    """
    results = {}
    pairs = list(pairs)
    for moving_contrast, fixed_contrast in contrast_pairs:
        before = {label: [] for label in labels}
        after = {label: [] for label in labels}
        negative = []
        for moving, fixed in pairs:
            phi = predict(moving.image(moving_contrast), fixed.image(fixed_contrast)).float().cpu()
            warped = warp_labels(moving.labels.cpu(), phi)
            for label in labels:
                before[label].append(dice(moving.labels.cpu(), fixed.labels.cpu(), label))
                after[label].append(dice(warped, fixed.labels.cpu(), label))
            negative.append(negative_jacobian_percent(phi))
        results[f"{moving_contrast}/{fixed_contrast}"] = {
            "before": {label: sum(v) / len(v) for label, v in before.items()},
            "after": {label: sum(v) / len(v) for label, v in after.items()},
            "negative_jacobian": sum(negative) / len(negative),
        }
    return results


def _held_out_dice(network: GradICONNetwork, config: TrainConfig, device) -> dict:
    """T1/T2 Dice on the first ``eval_pairs`` held-out pairs, network in eval mode."""
    network.eval()
    try:
        with torch.no_grad():
            pairs = synth.evaluation_pairs(config.eval_pairs, tuple(config.input_shape), device=device)
            return evaluate_pairs(lambda m, f: network(m, f), pairs, [("t1", "t2")])["t1/t2"]
    finally:
        network.train()


# ---------------------------------------------------------------- the loop

def _as_config(fields: dict) -> TrainConfig:
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _resolve_config(stored: dict | None, options: dict) -> TrainConfig:
    """The run's configuration: ``options`` over the defaults for a new run; for a resumed
    one the stored configuration, where ``options`` may change only :data:`RESUMABLE_OPTIONS`."""
    unknown = set(options) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise InvalidOptionError(f"unknown training options: {', '.join(sorted(unknown))}")
    if stored is None:
        return _as_config({**dataclasses.asdict(TrainConfig()), **options}).check()
    config = _as_config(stored)
    changes = {}
    for key, value in options.items():
        value = tuple(value) if isinstance(value, list) else value
        if value == getattr(config, key):
            continue
        if key not in RESUMABLE_OPTIONS:
            raise InvalidOptionError(
                f"the run being resumed was started with {key}={getattr(config, key)!r}, not {value!r}; only "
                f"{', '.join(RESUMABLE_OPTIONS)} may change on resuming (use another run directory)")
        changes[key] = value
    return dataclasses.replace(config, **changes).check()


def train(run_dir, config: TrainConfig | dict | None = None, *, device=None, max_seconds: float | None = None,
          init_weights=None) -> dict:
    """Train, or resume training, in ``run_dir`` up to ``config.steps``; returns the last step's terms
    (``{"step": step}`` alone where no step was left to take).

    ``config``: a :class:`TrainConfig`, or a dict of some of its fields (the rest default).
    When ``run_dir`` holds a checkpoint the run resumes from it with its stored configuration;
    ``config`` may then change only :data:`RESUMABLE_OPTIONS` (``{"steps": 40000}`` trains
    longer) and must agree on the rest. ``max_seconds``: stop, after saving, once this much
    wall time has passed (for sessions of bounded length). ``init_weights``: a new run starts
    from these weights (a ``.safetensors`` file such as the bundled compact model, of the run's
    network configuration) with a fresh optimizer, instead of the initialization; ignored when
    the run resumes.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InvalidOptionError(f"run directory {str(run_dir)!r} is a file; give a directory (new or a run's)")
    device = resolve_device(device)
    options = dataclasses.asdict(config) if isinstance(config, TrainConfig) else dict(config or {})
    stored = load_checkpoint_state(run_dir)
    config = _resolve_config(None if stored is None else stored["config"], options)

    with torch.random.fork_rng(devices=[]):  # the initial weights follow the run's seed
        torch.manual_seed(config.seed)
        # the engine's layout: on the CPU channels-last, a compact training step 1.12x faster
        network = GradICONNetwork(config.network_config()).to(device, memory_format=network_memory_format(device))
    network.unet_autocast = torch.bfloat16 if config.amp else None
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    step = 0
    if stored is not None:
        network.load_state_dict(stored["network"])
        optimizer.load_state_dict(stored["optimizer"])
        gen.set_state(stored["generator"])
        torch.set_rng_state(stored["torch_rng"])
        if stored.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(stored["cuda_rng"])
        step = int(stored["step"])
        for group in optimizer.param_groups:
            group["lr"] = config.lr
        if step < config.steps:
            log.info("resumed %s at step %d of %d (lr %g)", run_dir, step, config.steps, config.lr)
        else:
            log.info("%s is at step %d already, %d asked for: no step to take (steps N trains up to step N)",
                     run_dir, step, config.steps)
    else:
        if init_weights is not None:
            state, saved_config, _ = read_safetensors(init_weights)
            if saved_config is not None and saved_config != config.network_config():
                raise InvalidOptionError(
                    f"init_weights {str(init_weights)!r} hold a network {saved_config}, not the run's "
                    f"{config.network_config()}: pass the matching --input_shape and channels")
            load_official_state_dict(network, state)
            log.info("initial weights from %s", init_weights)
        log.info("new run in %s: %s", run_dir, config)
    try:  # only now: a run refused above (its options, its initial weights) leaves no folder behind
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"cannot create the run directory {str(run_dir)!r} ({exc.strerror or exc})") from exc
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))

    started, first_step = time.perf_counter(), step
    last = {}
    with open(run_dir / LOG_FILE, "a") as log_file:
        while step < config.steps:
            network.last_unet = step >= config.last_unet_from
            if step == config.last_unet_from and step > 0:  # stage 2: Psi4 joins, fresh optimizer
                optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)
                log.info("step %d: the last U-Net joins; new optimizer", step)
            step_started = time.perf_counter()
            batch = make_batch(config, gen, device)
            terms = training_step(network, optimizer, batch, config, gen)
            step += 1
            last = {"step": step, **terms, "seconds": time.perf_counter() - step_started}
            if step % config.log_every == 0 or step == config.steps:
                log.info("step %d: loss %.4f (similarity %.4f, gradicon %.5f), %.1f s/step", step, terms["loss"],
                         terms["similarity"], terms["gradicon"], last["seconds"])
            if config.eval_every and step % config.eval_every == 0:
                last["held_out_t1_t2"] = _held_out_dice(network, config, device)
                log.info("step %d: held-out T1/T2 Dice %s", step, last["held_out_t1_t2"])
            log_file.write(json.dumps(last) + "\n")
            log_file.flush()
            out_of_time = max_seconds is not None and time.perf_counter() - started > max_seconds
            if step % config.save_every == 0 or step == config.steps or out_of_time:
                save_checkpoint(run_dir, network=network, optimizer=optimizer, config=config, step=step, gen=gen)
                export_weights(network, run_dir / WEIGHTS_FILE, config=config, step=step)
            if out_of_time:
                log.info("stopping at step %d after %.0f s (max_seconds); resume with the same run directory",
                         step, time.perf_counter() - started)
                break
    if step == first_step:  # no step taken in this call: still write the weights it holds
        export_weights(network, run_dir / WEIGHTS_FILE, config=config, step=step)
    return last or {"step": step}
