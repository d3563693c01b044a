"""``python -m mgr_engine.demo --out DIR``: the whole pipeline end to end on a synthetic pair.

What it does, with nothing downloaded:

1. :func:`make_sample_pair` draws a deterministic synthetic 3-D "head" phantom (nested
   ellipsoid tissues, smooth bias field and noise): a T1-like fixed image on an anisotropic,
   oblique grid with a non-zero origin, and a T2-like moving image (tissue intensities
   permuted) of the same phantom under a smooth random deformation of a few mm, on a grid
   of slightly different spacing and origin; plus a uint8 tissue label map for each.
2. :func:`mgr_engine.model.randomize_weights` fills the official multiGradICON architecture with seeded
   random weights (no trained weights exist here yet), saved as ``Step_2_final.trch``.
3. ``mgr-engine register`` runs in-process (:func:`mgr_engine.cli.main`) without instance
   optimization, writing the transform, the warped moving image, the displacement field and
   the Jacobian determinant.
4. A report: files, wall time, folds (negative Jacobian) and the tissue Dice before/after.

The weights are RANDOM, so the registration is not meaningful: the demo shows that every
stage runs and what it writes, not registration accuracy.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("mgr_engine.demo")

SEED = 20240607
FULL_INPUT_SHAPE = (175, 175, 175)
QUICK_INPUT_SHAPE = (72, 72, 72)
# The last convolutions are scaled by this so the random network's displacements stay at a few voxels.
DISPLACEMENT_SCALE = 0.15

# Array shape (z, y, x) of both images and their grids (ITK order x, y, z, in mm).
SHAPE = (96, 112, 96)
FIXED_SPACING = (1.2, 1.0, 1.1)
MOVING_SPACING = (1.15, 1.05, 1.12)
HEAD_CENTRE = np.array([12.0, -18.0, 25.0])  # physical centre of the fixed grid (mm)
MOVING_CENTRE_SHIFT = np.array([2.5, -1.5, 1.8])  # the moving grid's centre is off by this (mm)
ROTATION_AXIS, ROTATION_DEGREES = (0.3, 0.2, 1.0), 10.0
MAX_DEFORMATION_MM = 4.0

# label, name, centre and semi-axes (mm, head frame: x left-right, y back-front, z feet-head),
# T1-like and T2-like intensities. Painted in order: later tissues overwrite earlier ones.
TISSUES = (
    (1, "scalp", (0, 0, 0), (44, 48, 42), 0.55, 0.35),
    (2, "skull", (0, 0, 1), (40, 44, 38), 0.08, 0.12),
    (3, "grey matter", (0, 0, 2), (36, 40, 34), 0.45, 0.70),
    (4, "white matter", (0, 2, 4), (27, 31, 24), 0.80, 0.40),
    (5, "ventricles", (-7, 4, 6), (4, 13, 7), 0.15, 1.00),
    (5, "ventricles", (7, 4, 6), (4, 13, 7), 0.15, 1.00),
    (6, "lesion", (14, -12, -6), (6, 5, 6), 0.30, 0.85),
)
LABEL_NAMES = {label: name for label, name, *_ in TISSUES}
BACKGROUND = 0.02
EDGE_MM = 0.7  # width of the partial-volume edge of each tissue


def _rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k  # Rodrigues


def _grid_points(shape, spacing, origin, direction) -> np.ndarray:
    """Physical points (x, y, z; mm) of every voxel of a (z, y, x) array, shape (*shape, 3)."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    index = np.stack([i, j, k], -1) * np.asarray(spacing)
    return np.asarray(origin) + index @ direction.T


def _smooth_noise(shape, rng, coarse=8) -> np.ndarray:
    """Smooth random field (zero mean, unit-ish amplitude): coarse noise upsampled trilinearly."""
    grid = torch.from_numpy(rng.standard_normal((1, 1, coarse, coarse, coarse)))
    return torch.nn.functional.interpolate(grid, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()


def _deformation(points_head: np.ndarray, rng) -> np.ndarray:
    """A smooth random displacement (mm) at head-frame points: a few low-frequency sinusoids
    per component, scaled to at most ``MAX_DEFORMATION_MM`` inside the head."""
    displacement = np.zeros_like(points_head)
    for component in range(3):
        for _ in range(4):
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            wavelength = rng.uniform(60.0, 120.0)
            phase = rng.uniform(0, 2 * np.pi)
            amplitude = rng.uniform(0.5, 1.0)
            displacement[..., component] += amplitude * np.sin(2 * np.pi * (points_head @ direction) / wavelength + phase)
    head = np.sum((points_head / np.asarray(TISSUES[0][3], float)) ** 2, -1) <= 1.0
    return displacement * (MAX_DEFORMATION_MM / np.abs(displacement[head]).max())


def _phantom(points_head: np.ndarray, contrast: int):
    """Intensities (``contrast`` 4: T1-like, 5: T2-like column of TISSUES) and labels at head-frame points."""
    image = np.full(points_head.shape[:-1], BACKGROUND)
    labels = np.zeros(points_head.shape[:-1], np.uint8)
    for tissue in TISSUES:
        label, centre, semi_axes, value = tissue[0], tissue[2], tissue[3], tissue[contrast]
        radius = np.sqrt(np.sum(((points_head - np.asarray(centre, float)) / np.asarray(semi_axes, float)) ** 2, -1))
        distance = (radius - 1.0) * min(semi_axes)  # approximate signed distance (mm) to the surface
        membership = 0.5 * (1 - np.tanh(distance / EDGE_MM))
        image = image * (1 - membership) + value * membership
        labels[distance <= 0] = label
    return image, labels


def _itk_image(array: np.ndarray, spacing, origin, direction):
    import itk

    image = itk.image_from_array(np.ascontiguousarray(array))
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction, dtype=np.float64)))
    return image


def make_sample_pair(out_dir) -> dict:
    """Write a deterministic synthetic T1-like/T2-like head pair and their tissue labels.

    Files (NIfTI) in ``out_dir``: ``fixed_t1.nii.gz``, ``moving_t2.nii.gz`` (float32),
    ``fixed_labels.nii.gz``, ``moving_labels.nii.gz`` (uint8; 0 background, 1-6 tissues).
    The moving image is the phantom deformed smoothly (up to ``MAX_DEFORMATION_MM``) with
    permuted tissue intensities, on a grid of slightly different spacing and origin; both grids
    share an oblique direction. Returns ``{"fixed", "moving", "fixed_labels", "moving_labels"}``
    paths.
    """
    from . import itk_io

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    direction = _rotation(ROTATION_AXIS, ROTATION_DEGREES)
    size = np.asarray(SHAPE[::-1], float)  # (x, y, z)

    def origin_for(centre, spacing):  # so that the grid's centre lies at ``centre``
        return centre - direction @ (np.asarray(spacing) * (size - 1) / 2)

    fixed_origin = origin_for(HEAD_CENTRE, FIXED_SPACING)
    moving_origin = origin_for(HEAD_CENTRE + MOVING_CENTRE_SHIFT, MOVING_SPACING)

    def head_frame(points):  # the head's axes are the fixed grid's axes
        return (points - HEAD_CENTRE) @ direction

    fixed_points = head_frame(_grid_points(SHAPE, FIXED_SPACING, fixed_origin, direction))
    fixed, fixed_labels = _phantom(fixed_points, contrast=4)
    moving_points = head_frame(_grid_points(SHAPE, MOVING_SPACING, moving_origin, direction))
    # moving(p) = phantom(p + u(p)): the phantom pulled back through a smooth deformation.
    moving, moving_labels = _phantom(moving_points + _deformation(moving_points, rng), contrast=5)

    def mri_like(image):  # smooth multiplicative bias, smooth texture, a little voxel noise
        bias = 1.0 + 0.08 * _smooth_noise(SHAPE, rng, coarse=4)
        texture = 0.015 * _smooth_noise(SHAPE, rng, coarse=24)
        noise = 0.005 * rng.standard_normal(SHAPE)
        return (1000.0 * np.clip(image * bias + texture + noise, 0, None)).astype(np.float32)

    paths = {name: out_dir / f"{name}.nii.gz" for name in ("fixed_t1", "moving_t2", "fixed_labels", "moving_labels")}
    for path, array, spacing, origin in (
        (paths["fixed_t1"], mri_like(fixed), FIXED_SPACING, fixed_origin),
        (paths["moving_t2"], mri_like(moving), MOVING_SPACING, moving_origin),
        (paths["fixed_labels"], fixed_labels, FIXED_SPACING, fixed_origin),
        (paths["moving_labels"], moving_labels, MOVING_SPACING, moving_origin),
    ):
        itk_io.write_image(_itk_image(array, spacing, origin, direction), path)
    return {"fixed": paths["fixed_t1"], "moving": paths["moving_t2"],
            "fixed_labels": paths["fixed_labels"], "moving_labels": paths["moving_labels"]}


def make_random_checkpoint(path, input_shape=FULL_INPUT_SHAPE, seed: int = SEED) -> Path:
    """Save a randomized-weights checkpoint of the official architecture (official key names)."""
    from .model import GradICONNetwork, NetworkConfig, official_state_dict, randomize_weights

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    network = randomize_weights(GradICONNetwork(NetworkConfig(input_shape=tuple(input_shape))), seed, DISPLACEMENT_SCALE)
    torch.save(official_state_dict(network), path)
    return path


def _read_image_array(path) -> np.ndarray:
    import itk

    return itk.array_from_image(itk.imread(str(path)))  # a copy: a view would outlive its image


def _mean_dice(a: np.ndarray, b: np.ndarray):
    """Mean Dice over the tissue labels (background excluded) and the per-label values."""
    per_label = {}
    for label in sorted(LABEL_NAMES):
        x, y = a == label, b == label
        total = int(x.sum()) + int(y.sum())
        if total:
            per_label[label] = 2.0 * int(np.logical_and(x, y).sum()) / total
    return float(np.mean(list(per_label.values()))), per_label


class _EngineTiming(logging.Handler):
    """Picks the engine's own "registered in %.2f s" log record, for the report."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.seconds = None

    def emit(self, record):
        if record.msg == "registered in %.2f s" and record.args:
            self.seconds = float(record.args[0])


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mgr_engine.demo",
        description="End-to-end demo of mgr_engine on a synthetic head pair, with RANDOM network weights.")
    parser.add_argument("--out", default="demo_output", help="output directory (default: demo_output)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smaller network input {'x'.join(map(str, QUICK_INPUT_SHAPE))} (seconds, for tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import itk

    from . import cli, itk_io

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    input_shape = QUICK_INPUT_SHAPE if args.quick else FULL_INPUT_SHAPE
    banner = ("!!! RANDOM WEIGHTS: this demo runs the network with randomly initialized weights (the bundled trained "
              "model is a later issue). The result is NOT a meaningful registration; it exercises the whole pipeline. !!!")
    print(banner, flush=True)

    started = time.perf_counter()
    data = make_sample_pair(out / "data")
    log.info("sample pair written in %.1f s", time.perf_counter() - started)
    started = time.perf_counter()
    checkpoint = make_random_checkpoint(out / "random_weights" / "Step_2_final.trch", input_shape)
    log.info("random checkpoint written in %.1f s", time.perf_counter() - started)

    outputs = {
        "transform": out / "transform.h5",
        "warped moving": out / "warped_moving.nii.gz",
        "displacement field": out / "displacement.nii.gz",
        "Jacobian determinant": out / "jacobian.nii.gz",
    }
    argv_cli = [
        "register", "--fixed", str(data["fixed"]), "--moving", str(data["moving"]),
        "--fixed_modality", "mri", "--moving_modality", "mri",
        "--model", "multigradicon", "--network_weights", str(checkpoint), "--io_iterations", "None",
        "--transform_out", str(outputs["transform"]), "--warped_moving_out", str(outputs["warped moving"]),
        "--displacement_field_out", str(outputs["displacement field"]),
        "--jacobian_out", str(outputs["Jacobian determinant"]),
    ]
    if args.quick:
        argv_cli += ["--network_input_shape", *map(str, QUICK_INPUT_SHAPE)]
    print("instance optimization (IO) is OFF (--io_iterations None): one IO step takes about a minute at "
          "175^3 on a 2-core CPU, so the default 50 steps would take most of an hour here.", flush=True)
    print("running: mgr-engine " + " ".join(argv_cli), flush=True)
    engine_timing = _EngineTiming()
    logging.getLogger("mgr_engine").addHandler(engine_timing)
    started = time.perf_counter()
    try:
        status = cli.main(argv_cli)
    finally:
        elapsed = time.perf_counter() - started
        logging.getLogger("mgr_engine").removeHandler(engine_timing)
    if status != 0:
        print(f"demo: mgr-engine register failed (exit status {status}); see the error above.", file=sys.stderr)
        return status

    # Evaluation: folds and tissue overlap, before (identity) and after (the written transform).
    fixed_labels = itk_io.load_image(data["fixed_labels"], "fixed labels")
    moving_labels = itk_io.load_image(data["moving_labels"], "moving labels")
    fixed_label_array = itk.array_from_image(fixed_labels)
    identity = itk.IdentityTransform[itk.D, 3].New()
    before = itk.array_from_image(itk_io.resample(moving_labels, identity, fixed_labels, "nearest"))
    transform = itk.transformread(str(outputs["transform"]))[0]
    warped_labels = itk_io.resample(moving_labels, transform, fixed_labels, "nearest")
    outputs["warped moving labels"] = out / "warped_moving_labels.nii.gz"
    itk_io.write_image(warped_labels, outputs["warped moving labels"])
    after = itk.array_from_image(warped_labels)
    dice_before, per_before = _mean_dice(fixed_label_array, before)
    dice_after, per_after = _mean_dice(fixed_label_array, after)
    jacobian = _read_image_array(outputs["Jacobian determinant"])
    negative = 100.0 * float(np.count_nonzero(jacobian < 0)) / jacobian.size
    displacement = _read_image_array(outputs["displacement field"])
    displacement_mm = np.linalg.norm(displacement.reshape(-1, 3), axis=1)

    print()
    print(banner)
    print(f"network input {'x'.join(map(str, input_shape))}{' (--quick)' if args.quick else ''}, "
          f"instance optimization off, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print("files written:")
    for label, path in (("fixed image (T1-like)", data["fixed"]), ("moving image (T2-like)", data["moving"]),
                        ("fixed labels", data["fixed_labels"]), ("moving labels", data["moving_labels"]),
                        ("random checkpoint", checkpoint), *outputs.items()):
        print(f"  {label:24s} {path}  ({_size(Path(path))})")
    print(f"registration wall time (mgr-engine register in-process: load weights, register, "
          f"write outputs): {elapsed:.1f} s"
          + (f", of which Engine.register {engine_timing.seconds:.1f} s" if engine_timing.seconds is not None else ""))
    print(f"displacement on the fixed grid: mean {displacement_mm.mean():.2f} mm, max {displacement_mm.max():.2f} mm")
    print(f"fixed voxels with negative Jacobian determinant: {negative:.3f} % "
          f"(Jacobian min {jacobian.min():.3f}, max {jacobian.max():.3f})")
    print(f"mean tissue Dice ({len(per_before)} labels): before (identity) {dice_before:.3f}, "
          f"after (transform) {dice_after:.3f}")
    for label in per_before:
        print(f"    {LABEL_NAMES[label]:13s} {per_before[label]:.3f} -> {per_after.get(label, 0.0):.3f}")
    print("(random weights: a change in Dice here says nothing about registration accuracy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
