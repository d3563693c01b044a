"""``python -m mgr_engine.demo --out DIR`` (``make demo``): register the bundled sample pair with
the bundled compact model, nothing downloaded.

1. The sample pair (``mgr_engine/data/sample_pair/``, built once by :func:`build_sample_pair`
   from the MNI ICBM152 2009 template that nilearn ships; notice in ``NOTICE-MNI-ICBM152.txt``):
   a T1-like fixed image and a T2-like moving image of two different synthetic "patients"
   (the template under two random smooth deformations and affines), each on its own oblique,
   anisotropic grid, with CSF/GM/WM label maps.
2. ``mgr-engine register --model compact`` runs in-process (:func:`mgr_engine.cli.main`),
   without instance optimization unless ``--io_iterations`` says otherwise, writing the
   transform, the warped moving image, the displacement field and the Jacobian determinant.
3. A report: wall time, % of fixed voxels with negative Jacobian determinant, Dice per tissue
   before (identity in physical space) and after (moving labels through the transform), and a
   PNG of orthogonal slices: fixed, moving before, moving after, and the fixed image's edges
   over the moving image after registration.
"""

from __future__ import annotations

import argparse
import logging
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from .engine import BUNDLED_WEIGHTS as _BUNDLED
from .labels import dice_before_and_after

log = logging.getLogger("mgr_engine.demo")

BUNDLED_WEIGHTS = _BUNDLED["compact"]
SAMPLE_DIR = Path(__file__).parent / "data" / "sample_pair"
SAMPLE_FILES = {"fixed": "fixed_t1.nii.gz", "moving": "moving_t2.nii.gz",
                "fixed_labels": "fixed_labels.nii.gz", "moving_labels": "moving_labels.nii.gz"}
TISSUES = {1: "CSF", 2: "GM", 3: "WM"}

# How the sample pair was built (build_sample_pair). Seeds far above the evaluation pairs'
# (synth.evaluation_pairs) and never drawn by training (synth.HOLDOUT_START).
SAMPLE_SEEDS = (10**12 + 10**6, 10**12 + 10**6 + 1)
SAMPLE_RENDER_SHAPE = (112, 112, 112)
HEAD_CENTRE_MM = np.array([4.0, -18.0, 12.0])
# Grids in ITK order (x, y, z): spacing (mm), rotation axis and angle of the direction matrix,
# offset of the grid's centre from the head's centre (mm).
FIXED_GRID = {"spacing": (1.3, 1.1, 1.5), "axis": (0.2, 1.0, 0.3), "degrees": 9.0, "shift": (0.0, 0.0, 0.0)}
MOVING_GRID = {"spacing": (1.1, 1.45, 1.25), "axis": (1.0, 0.3, -0.2), "degrees": 7.0, "shift": (3.0, -2.0, 2.5)}

NOTICE = """The sample pair in this folder (fixed_t1, moving_t2 and their label maps) was derived by
mgr_engine (mgr_engine/demo.py, build_sample_pair) from the MNI ICBM152 2009a nonlinear
symmetric template (T1 image, grey- and white-matter probability maps) as distributed inside
the nilearn package: each image is the template under a random smooth deformation and affine,
re-rendered with synthetic contrasts, bias fields and noise, and resampled onto an oblique
grid. The template's notice follows.

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University. Permission to use, copy, modify, and distribute this software and its
documentation for any purpose and without fee is hereby granted, provided that the above copyright
notice appear in all copies. The authors and McGill University make no representations about the
suitability of this software for any purpose. It is provided "as is" without express or implied
warranty. The authors are not responsible for any data loss, equipment damage, property loss, or
injury to subjects or patients resulting from the use or misuse of this software package.

References: V. Fonov et al., NeuroImage 47 (2009) S102; V. Fonov et al., NeuroImage 54 (2011) 313-327;
D. L. Collins et al., Proc. 5th Int. Conf. Functional Mapping of the Human Brain (1999).
"""


# ---------------------------------------------------------------- building the sample pair


def _rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _grid(grid: dict, extent_mm: float):
    """Size, spacing, origin, direction (ITK order) of an oblique grid covering a cube of side
    ``extent_mm`` centred at the head's centre plus the grid's shift."""
    spacing = np.asarray(grid["spacing"], float)
    direction = _rotation(grid["axis"], grid["degrees"])
    size = np.ceil(extent_mm / spacing).astype(int)
    centre = HEAD_CENTRE_MM + np.asarray(grid["shift"], float)
    origin = centre - direction @ (spacing * (size - 1) / 2)
    return size, spacing, origin, direction


def _sample_on_grid(volume: torch.Tensor, cube_mm: float, size, spacing, origin, direction) -> torch.Tensor:
    """``volume`` (1, C, N, N, N), an axis-aligned cube of side ``cube_mm`` centred at the head's
    centre (array axes z, y, x), sampled trilinearly at the grid's points: (C, nz, ny, nx)."""
    n = volume.shape[-1]
    k, j, i = np.meshgrid(*(np.arange(s) for s in size[::-1]), indexing="ij")
    index = np.stack([i, j, k], -1).reshape(-1, 3).astype(float)  # ITK order x, y, z
    points = origin + (index * spacing) @ direction.T
    cube_index = (points - HEAD_CENTRE_MM) / (cube_mm / n) + (n - 1) / 2
    grid = torch.from_numpy(cube_index / (n - 1) * 2 - 1).float().reshape(1, *size[::-1], 3)
    sampled = torch.nn.functional.grid_sample(volume.float(), grid, mode="bilinear", padding_mode="zeros",
                                              align_corners=True)
    return sampled[0]


def build_sample_pair(out_dir=SAMPLE_DIR) -> dict:
    """Write the bundled sample pair to ``out_dir`` (needs nilearn, the ``train`` extra).

    Two held-out synthetic patients (:func:`mgr_engine.synth.brain_patient`) rendered at
    :data:`SAMPLE_RENDER_SHAPE` over the template's cropped cube (1 mm template voxels), the
    first as T1, the second as T2; each is resampled onto its own oblique anisotropic grid
    (:data:`FIXED_GRID`, :data:`MOVING_GRID`) and stored as uint8 (intensities scaled to 0..255)
    with a uint8 label map (0 background, 1 CSF, 2 GM, 3 WM: argmax of the resampled tissue
    probabilities).
    """
    import itk

    from . import itk_io, synth

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cube_mm = float(synth.load_template(SAMPLE_RENDER_SHAPE)["side_mm"])
    written = {}
    for role, seed, contrast, grid in (("fixed", SAMPLE_SEEDS[0], "t1", FIXED_GRID),
                                       ("moving", SAMPLE_SEEDS[1], "t2", MOVING_GRID)):
        patient = synth.brain_patient(seed, SAMPLE_RENDER_SHAPE)
        size, spacing, origin, direction = _grid(grid, cube_mm * 1.05)
        image = _sample_on_grid(patient.image(contrast), cube_mm, size, spacing, origin, direction)[0]
        tissue = _sample_on_grid(patient.tissue, cube_mm, size, spacing, origin, direction)
        tissue[0] += 1e-3  # outside the cube (all zero): background
        arrays = {role: (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy(),
                  f"{role}_labels": tissue.argmax(0).to(torch.uint8).numpy()}
        for key, array in arrays.items():
            itk_image = itk.image_from_array(np.ascontiguousarray(array))
            itk_image.SetSpacing(spacing.tolist())
            itk_image.SetOrigin(origin.tolist())
            itk_image.SetDirection(itk.matrix_from_array(direction))
            written[key] = out_dir / SAMPLE_FILES[key]
            itk_io.write_image(itk_image, written[key])
    (out_dir / "NOTICE-MNI-ICBM152.txt").write_text(NOTICE)
    return written


# ---------------------------------------------------------------- the report


def _read_array(path) -> np.ndarray:
    import itk

    from . import itk_io

    return itk.array_from_image(itk_io.read_image(path))


def _isotropic_slice(array: np.ndarray, row_mm: float, col_mm: float, pixel_mm: float) -> np.ndarray:
    """A 2-D slice resampled (nearest) to square pixels of ``pixel_mm``, so anatomy keeps its shape."""
    rows = np.minimum((np.arange(int(array.shape[0] * row_mm / pixel_mm)) * pixel_mm / row_mm).astype(int),
                      array.shape[0] - 1)
    cols = np.minimum((np.arange(int(array.shape[1] * col_mm / pixel_mm)) * pixel_mm / col_mm).astype(int),
                      array.shape[1] - 1)
    return array[np.ix_(rows, cols)]


def orthogonal_slices(volume: np.ndarray, spacing_xyz) -> list:
    """The three central slices of ``volume`` (z, y, x), axial, coronal and sagittal, flipped so
    that superior/anterior is up, at square pixels."""
    sx, sy, sz = spacing_xyz
    pixel = min(spacing_xyz)
    cz, cy, cx = (n // 2 for n in volume.shape)
    return [_isotropic_slice(volume[cz][::-1], sy, sx, pixel),
            _isotropic_slice(volume[:, cy][::-1], sz, sx, pixel),
            _isotropic_slice(volume[:, :, cx][::-1], sz, sy, pixel)]


def _edges(image: np.ndarray) -> np.ndarray:
    """Where the gradient magnitude of ``image`` (2-D, in [0, 1]) is in its top 12 %."""
    gy, gx = np.gradient(image.astype(np.float32))
    magnitude = np.hypot(gx, gy)
    return magnitude > np.quantile(magnitude, 0.88)


def write_png(path, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as a PNG (zlib only: no imaging library needed)."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(rgb, dtype=np.uint8))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def overview_png(path, fixed: np.ndarray, before: np.ndarray, after: np.ndarray, spacing_xyz) -> None:
    """Rows: fixed, moving before, moving after, fixed edges (red) over moving after; columns:
    axial, coronal, sagittal central slices of the fixed grid."""
    def normalized(volume):
        high = float(np.quantile(volume, 0.995)) or 1.0
        return np.clip(volume / high, 0, 1)

    rows = []
    views = [orthogonal_slices(normalized(v), spacing_xyz) for v in (fixed, before, after)]
    overlay = []
    for fixed_slice, after_slice in zip(views[0], views[2]):
        rgb = np.repeat(after_slice[..., None], 3, -1)
        rgb[_edges(fixed_slice)] = (1.0, 0.15, 0.1)
        overlay.append(rgb)
    for row in (*views, overlay):
        height = max(s.shape[0] for s in row)
        tiles = []
        for s in row:
            rgb = s if s.ndim == 3 else np.repeat(s[..., None], 3, -1)
            pad = np.zeros((height - rgb.shape[0], rgb.shape[1], 3))
            tiles += [np.concatenate([rgb, pad]), np.zeros((height, 4, 3))]
        rows.append(np.concatenate(tiles[:-1], 1))
    width = max(r.shape[1] for r in rows)
    rows = [np.concatenate([r, np.zeros((r.shape[0], width - r.shape[1], 3))], 1) for r in rows]
    picture = np.concatenate([x for r in rows for x in (r, np.zeros((4, width, 3)))][:-1], 0)
    write_png(path, (picture * 255).round().astype(np.uint8))


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
        description="Register the bundled T1/T2 sample pair with the bundled compact model and report the result.")
    parser.add_argument("--out", default="demo_output", help="output directory (default: demo_output)")
    parser.add_argument("--weights", help="compact-model weights (default: the bundled ones)")
    parser.add_argument("--io_iterations", type=int, default=0,
                        help="instance-optimization steps (default 0; the paper's 50 take minutes on a CPU)")
    parser.add_argument("--io_sim", default="lncc2", choices=["lncc", "lncc2", "mind"],
                        help="IO similarity (default lncc2)")
    parser.add_argument("--build_sample_pair", metavar="DIR", help=argparse.SUPPRESS)  # maintainers: rebuild data
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.build_sample_pair:
        for key, path in build_sample_pair(args.build_sample_pair).items():
            print(f"{key}: {path} ({_size(path)})")
        return 0

    import itk

    from . import cli, itk_io

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {key: SAMPLE_DIR / name for key, name in SAMPLE_FILES.items()}
    outputs = {
        "transform": out / "transform.h5",
        "warped moving": out / "warped_moving.nii.gz",
        "displacement field": out / "displacement.nii.gz",
        "Jacobian determinant": out / "jacobian.nii.gz",
    }
    argv_cli = [
        "register", "--fixed", str(data["fixed"]), "--moving", str(data["moving"]),
        "--fixed_modality", "mri", "--moving_modality", "mri", "--model", "compact",
        "--io_iterations", str(args.io_iterations) if args.io_iterations else "None", "--io_sim", args.io_sim,
        "--transform_out", str(outputs["transform"]), "--warped_moving_out", str(outputs["warped moving"]),
        "--displacement_field_out", str(outputs["displacement field"]),
        "--jacobian_out", str(outputs["Jacobian determinant"]),
    ]
    if args.weights:
        argv_cli += ["--network_weights", args.weights]
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

    # Evaluation on the fixed grid: tissue overlap before (identity in physical space) and after.
    fixed = itk_io.load_image(data["fixed"], "fixed image")
    moving = itk_io.load_image(data["moving"], "moving image")
    fixed_labels = itk_io.load_image(data["fixed_labels"], "fixed labels")
    moving_labels = itk_io.load_image(data["moving_labels"], "moving labels")
    identity = itk_io.identity_transform()
    transform = itk_io.read_transform(outputs["transform"])
    warped_labels = itk_io.resample(moving_labels, transform, fixed_labels, "nearest")  # ITK's own filter
    outputs["warped moving labels"] = out / "warped_moving_labels.nii.gz"
    itk_io.write_image(warped_labels, outputs["warped moving labels"])
    dice_before, dice_after = dice_before_and_after(fixed_labels, moving_labels, warped_labels)
    jacobian = _read_array(outputs["Jacobian determinant"])
    negative = 100.0 * float(np.count_nonzero(jacobian < 0)) / jacobian.size
    displacement = _read_array(outputs["displacement field"])
    displacement_mm = np.linalg.norm(displacement.reshape(-1, 3), axis=1)
    outputs["overview PNG"] = out / "overview.png"
    overview_png(outputs["overview PNG"], itk.array_from_image(fixed).astype(np.float32),
                 itk.array_from_image(itk_io.resample(moving, identity, fixed)).astype(np.float32),
                 _read_array(outputs["warped moving"]).astype(np.float32),
                 tuple(fixed.GetSpacing()))

    print()
    print(f"compact model, instance optimization {f'{args.io_iterations} steps ({args.io_sim})' if args.io_iterations else 'off'}, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print("files written:")
    for label, path in outputs.items():
        print(f"  {label:24s} {path}  ({_size(Path(path))})")
    print(f"registration wall time (mgr-engine register in-process: load weights, register, write outputs): "
          f"{elapsed:.1f} s" + (f", of which Engine.register {engine_timing.seconds:.1f} s"
                                if engine_timing.seconds is not None else ""))
    print(f"displacement on the fixed grid: mean {displacement_mm.mean():.2f} mm, max {displacement_mm.max():.2f} mm")
    print(f"fixed voxels with negative Jacobian determinant: {negative:.3f} % "
          f"(Jacobian min {jacobian.min():.3f}, max {jacobian.max():.3f})")
    print("Dice per tissue, before (identity) -> after (transform):")
    for label, name in TISSUES.items():
        print(f"    {name:4s} {dice_before[label]:.3f} -> {dice_after[label]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
