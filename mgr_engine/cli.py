"""``mgr-engine register|warp|jacobian``: drop-in replacements for ``unigradicon-register``,
``unigradicon-warp`` and ``unigradicon-jacobian``; ``mgr-engine register-many`` registers the
pairs of a CSV file (:meth:`mgr_engine.Engine.register_many`); ``mgr-engine transform-points``
moves landmarks of the fixed image into moving space (:mod:`mgr_engine.points`); ``mgr-engine
dice`` measures a transform by the overlap of segmentations (:mod:`mgr_engine.labels`);
``mgr-engine train`` trains a model (:mod:`mgr_engine.train`); ``mgr-engine info`` says what the
installation has (:mod:`mgr_engine.info`).

The subcommands take the same flags as the authors' commands (and their defaults:
``--model unigradicon``, ``--io_sim lncc``, 50 IO steps), so a script switches by
renaming the command. Outputs are written atomically: after an error or Ctrl-C no
half-written file is left behind. ``mgr-engine export-onnx`` writes the ONNX graphs
(:func:`mgr_engine.export_onnx`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from .errors import ImageReadError, InvalidOptionError, MgrEngineError, OutputWriteError

log = logging.getLogger("mgr_engine")
# A command's findings (Dice, target registration errors, the Jacobian's summary): logged at INFO
# but kept under -q, which hides the progress lines and bars only; a command without an output
# file for them would otherwise print nothing.
results_log = logging.getLogger("mgr_engine.results")

PHYSICAL_JACOBIAN_HELP = (
    "Jacobian determinant along the physical axes (the image direction applied): the local volume change. Default: "
    "along the fixed image's index axes, as ITK's filter and unigradicon-jacobian compute it; the two differ on "
    "oblique images")


def _pairs(count: int) -> str:
    return f"{count} pair{'' if count == 1 else 's'}"


def _io_iterations(text: str):
    if text in ("None", "none", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--io_iterations takes an integer or None, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("--io_iterations must not be negative")
    return value


def _add_register(sub):
    p = sub.add_parser("register", help="register two images (unigradicon-register's flags)")
    p.add_argument("--fixed", required=True, help="path of the fixed image (a file ITK reads, a DICOM series folder, or a FreeSurfer .mgz)")
    p.add_argument("--moving", required=True, help="path of the moving image (a file, a DICOM series folder, or an .mgz)")
    p.add_argument("--fixed_modality", required=True, choices=["ct", "mri"])
    p.add_argument("--moving_modality", required=True, choices=["ct", "mri"])
    p.add_argument("--fixed_mask", help="binary mask on the fixed image's grid (0 outside, a positive whole number inside)")
    p.add_argument("--moving_mask", help="binary mask on the moving image's grid (0 outside, a positive whole number inside)")
    p.add_argument("--input_masking", action="store_true", help="zero the images outside their masks before the network")
    p.add_argument("--loss_function_masking", action="store_true", help="compute the IO similarity inside the masks only")
    p.add_argument("--match_orientation", action="store_true", help=MATCH_ORIENTATION_HELP)
    p.add_argument("--transform_out", required=True, help="output transform (.h5 or .tfm): fixed point -> moving point")
    p.add_argument("--warped_moving_out", help="output: the moving image resampled onto the fixed grid")
    p.add_argument("--inverse_transform_out",
                   help="output transform (.h5 or .tfm): moving point -> fixed point, the network's backward map "
                        "(without IO one more forward pass); for moving-space landmarks or images into fixed space")
    p.add_argument("--io_iterations", type=_io_iterations, default=50, help="IO steps (default 50); 'None' disables IO")
    p.add_argument("--io_lr", type=float, default=2e-5, help="IO learning rate (default 2e-5)")
    p.add_argument("--io_sim", default="lncc", choices=["lncc", "lncc2", "mind"], help="IO similarity (default lncc)")
    p.add_argument("--model", default="unigradicon", choices=["unigradicon", "multigradicon", "compact"])
    p.add_argument("--network_weights", help="checkpoint (Step_2_final.trch); default: see README, nothing is downloaded")
    p.add_argument("--ct_window", nargs=2, type=float, metavar=("MIN", "MAX"), help="CT window in HU (default -1000 1000)")
    p.add_argument("--quantile_range", nargs=2, type=float, metavar=("LOWER", "UPPER"),
                   help="MRI clipping quantiles, between 0 and 1 (default: image minimum and 0.99; 0.01 0.99 clips at "
                        "the 1st and 99th percentiles)")
    # Flags of unigradicon-register that mgr_engine does not implement: accepted, refused if used.
    p.add_argument("--fixed_segmentation", help=argparse.SUPPRESS)
    p.add_argument("--moving_segmentation", help=argparse.SUPPRESS)
    p.add_argument("--intensity_conservation_loss", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dice_loss_weight", type=float, default=0.0, help=argparse.SUPPRESS)
    # mgr_engine's own options.
    p.add_argument("--displacement_field_out", help="output: dense displacement field on the fixed grid (mm)")
    p.add_argument("--jacobian_out", help="output: Jacobian determinant on the fixed grid")
    p.add_argument("--physical_jacobian", action="store_true", help=PHYSICAL_JACOBIAN_HELP)
    p.add_argument("--network_input_shape", nargs=3, type=int, metavar=("D", "H", "W"),
                   help="input shape of a non-official network configuration (default 175 175 175; "
                        "at least 65 voxels per axis for U-Nets of the official depth)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                   help="arithmetic of the forward without IO (default fp32; IO's: --io_precision); "
                        "tf32 and bf16 are for CUDA (bf16 is slower on the CPU)")
    p.add_argument("--io_precision", default="fp32", choices=IO_PRECISION_CHOICES, help=IO_PRECISION_HELP)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the forward (CUDA graphs on a GPU); pays off over many registrations")
    p.add_argument("--io_checkpointing", action="store_true",
                   help="recompute U-Net activations (and, on the CPU, the maps) during IO's backward: less memory, "
                        "more time")
    p.add_argument("--seed", type=int, help="seed for IO's random regularizer grid (reproducible IO)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"],
                   help="run the network's forward in PyTorch (default) or ONNX Runtime; IO stays in PyTorch")
    p.add_argument("--onnx_model", help="with --backend onnxruntime: a full-graph .onnx file or a directory of stage "
                                        "graphs (mgr-engine export-onnx); default: exported from the weights in memory")
    p.add_argument("--onnx_providers", help="comma-separated ONNX Runtime providers: cpu, cuda, tensorrt "
                                            "(default: cuda,cpu with onnxruntime-gpu, else cpu)")
    p.set_defaults(run=run_register)


# engine.IO_PRECISIONS, written out: the parser is built without importing torch
IO_PRECISION_CHOICES = ("fp32", "tf32", "tf32x3")
IO_PRECISION_HELP = ("arithmetic of IO's convolutions on CUDA (default fp32; no effect on the CPU): tf32 runs them on "
                     "TF32 tensor cores (faster, operands rounded to 10 bits), tf32x3 as three TF32 products each "
                     "(float32's accuracy)")
MATCH_ORIENTATION_HELP = ("reorder the moving image's voxels onto the fixed image's axes before the network where "
                          "their axes point in different anatomical directions (a warning says when), as the "
                          "unigradicon reference does not: the network compares the volumes voxel axis by voxel axis")
_INDEX_BASE_HELP = ("with voxel indices: the first voxel's index, 0 (the default: ITK, numpy) or 1 (tables that count "
                    "from 1, such as DIR-Lab's)")


# register-many's --image_format: extensions of formats ITK writes (mgz: through nibabel)
IMAGE_FORMATS = ("nii.gz", "nii", "nrrd", "mha", "mgz")


def _add_register_many(sub):
    p = sub.add_parser("register-many", help="register the pairs listed in a CSV file, reading ahead while the network runs",
                       description="Register every pair of a CSV file with one resident engine (mgr_engine.register_many): "
                                   "columns fixed, moving, and optionally name, fixed_mask, moving_mask, fixed_points, "
                                   "moving_points (relative paths are taken from the CSV file's directory). Writes "
                                   "OUT_DIR/NAME_transform.h5 per pair (NAME: the name column, else pair_<row>), each "
                                   "atomically, as soon as it is computed. A pair's fixed_points (landmarks, see "
                                   "transform-points) are moved into OUT_DIR/NAME_<their file name>; with its "
                                   "moving_points, the target registration error goes into OUT_DIR/tre.csv, one row "
                                   "per pair, rewritten after each. A pair's moving_labels (a segmentation) are "
                                   "warped into OUT_DIR/NAME_warped_labels.nii.gz (nearest neighbour; --image_format "
                                   "names another format); with its "
                                   "fixed_labels, the Dice of each label before and after goes into OUT_DIR/dice.csv. "
                                   "A bad pair stops the run with its error; the pairs "
                                   "before it are written.")
    p.add_argument("--pairs", required=True,
                   help="CSV file (UTF-8; commas, semicolons or tabs) with a header row: fixed,moving[,name,fixed_mask,"
                        "moving_mask,fixed_points,moving_points,fixed_labels,moving_labels]")
    p.add_argument("--out_dir", required=True, help="directory of the outputs (created if missing)")
    p.add_argument("--fixed_modality", default="mri", choices=["ct", "mri"])
    p.add_argument("--moving_modality", default="mri", choices=["ct", "mri"])
    p.add_argument("--model", default="multigradicon", choices=["unigradicon", "multigradicon", "compact"])
    p.add_argument("--network_weights", help="checkpoint (Step_2_final.trch); default: see README, nothing is downloaded")
    p.add_argument("--io_iterations", type=_io_iterations, default=None,
                   help="IO steps per pair (default None: no IO, pairs are batched)")
    p.add_argument("--io_sim", default="lncc2", choices=["lncc", "lncc2", "mind"], help="IO similarity (default lncc2)")
    p.add_argument("--io_lr", type=float, default=2e-5, help="IO learning rate (default 2e-5)")
    p.add_argument("--masking", default="loss", choices=["loss", "input", "both"],
                   help="what the masks of the CSV do (default loss: IO's similarity only)")
    p.add_argument("--match_orientation", action="store_true", help=MATCH_ORIENTATION_HELP)
    p.add_argument("--batch_size", type=int, default=1, help="pairs per network forward without IO (default 1)")
    p.add_argument("--prefetch", type=int, default=2, help="batches read ahead (default 2)")
    p.add_argument("--warped", action="store_true", help="also write OUT_DIR/NAME_warped.nii.gz (moving on the fixed grid)")
    p.add_argument("--inverse_transforms", action="store_true",
                   help="also write OUT_DIR/NAME_inverse_transform.h5: moving-space point -> fixed-space point (the "
                        "network's backward map, as register --inverse_transform_out; without IO one more forward "
                        "per pair)")
    p.add_argument("--displacement_fields", action="store_true",
                   help="also write OUT_DIR/NAME_displacement.nii.gz: the dense displacement field on the fixed grid "
                        "(mm, as register --displacement_field_out)")
    p.add_argument("--jacobians", action="store_true",
                   help="also write OUT_DIR/NAME_jacobian.nii.gz: the Jacobian determinant on the fixed grid "
                        "(as register --jacobian_out)")
    p.add_argument("--image_format", default="nii.gz", choices=IMAGE_FORMATS,
                   help="file format of the images written (warped images and labels, displacement fields, Jacobians; "
                        "default nii.gz); mgz takes no displacement field")
    p.add_argument("--jacobian_stats", action="store_true",
                   help="tabulate each transform's Jacobian determinant on the fixed grid in OUT_DIR/jacobian.csv: "
                        "min, max, percentage of voxels at or below 0 (folds), SD of its log (as mgr-engine jacobian "
                        "logs)")
    p.add_argument("--physical_jacobian", action="store_true",
                   help="with --jacobian_stats or --jacobians: " + PHYSICAL_JACOBIAN_HELP)
    p.add_argument("--keep_going", action="store_true",
                   help="a pair that fails while it is registered (an image that cannot be read or is constant, "
                        "instance optimization that diverged, landmarks or labels that do not fit) is logged and "
                        "skipped, and the run goes on; it then ends with an error that names the pairs skipped "
                        "(--resume registers only those once mended). Missing files are still refused before the "
                        "first registration")
    p.add_argument("--resume", action="store_true",
                   help="pairs whose OUT_DIR/NAME_transform.h5 exists (an earlier run's; with --inverse_transforms, "
                        "and NAME_inverse_transform.h5) are not registered again; "
                        "their other outputs and table rows are computed from that file, so the tables cover every "
                        "pair. Refused where the model, checkpoint or registration options differ from those "
                        "OUT_DIR/register_many.json records, or a pair's image or mask files from those its "
                        "transform was computed from (recorded by SHA-256); a transform it does not record (a run "
                        "with other options replaced the record) is registered again")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                   help="arithmetic of the forward without IO (default fp32); tf32 and bf16 are for CUDA")
    p.add_argument("--io_precision", default="fp32", choices=IO_PRECISION_CHOICES, help=IO_PRECISION_HELP)
    p.add_argument("--compile", action="store_true", help="torch.compile the forward (CUDA graphs on a GPU)")
    p.add_argument("--seed", type=int, help="seed for IO's random regularizer grid (reproducible IO)")
    p.add_argument("--points_in_voxels", action="store_true",
                   help="the points files hold continuous voxel indices (i, j, k: a NIfTI file's voxel axes): "
                        "fixed_points of the pair's fixed image, moving_points and the moved points of its moving image "
                        "(see transform-points --voxel_indices)")
    p.add_argument("--index_base", type=int, choices=[0, 1], help=_INDEX_BASE_HELP)
    p.set_defaults(run=run_register_many)


def _read_pairs_csv(path):
    """``(names, pairs, landmarks, labels)`` from a register-many CSV file (landmarks and labels:
    each pair's ``(fixed, moving)`` files or None): paths relative to the file's directory."""
    import csv
    import io
    from pathlib import Path

    path = Path(path)
    try:
        # UTF-8 whatever the locale (a C locale would decode as ASCII), with or without the byte
        # order mark spreadsheet programs write
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ImageReadError(f"cannot read the pairs file {str(path)!r} ({exc.strerror or exc}); check the path.") from exc
    except UnicodeDecodeError as exc:
        raise InvalidOptionError(f"the pairs file {str(path)!r} is not UTF-8 text (byte {exc.start}); save it as "
                                 "UTF-8 (a spreadsheet's 'CSV UTF-8')") from exc
    header = text.partition("\n")[0]
    # a comma, or the semicolon spreadsheets write where the comma is the decimal mark, or a tab
    delimiter = next((d for d in ",;\t" if {"fixed", "moving"} <= {c.strip() for c in header.split(d)}), ",")
    rows = [row for row in csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True)
            if any(isinstance(value, str) and value.strip() for value in row.values())]  # a spreadsheet's ",,," rows
    columns = set(rows[0]) if rows else set()
    if not {"fixed", "moving"} <= columns or columns - {"fixed", "moving", *_OPTIONAL_PAIR_COLUMNS}:
        raise InvalidOptionError(f"{str(path)!r} needs a header row with the columns fixed and moving (optionally "
                                 f"{', '.join(_OPTIONAL_PAIR_COLUMNS)}) and at least one pair; found "
                                 f"{sorted(columns) or 'no rows'}")

    def resolve(value):  # absolute: ITK's module loader changes the working directory under other threads
        return None if not value else str((path.parent / value).absolute())

    names, pairs, landmarks, labels = [], [], [], []
    for index, row in enumerate(rows):
        names.append(row.get("name") or f"pair_{index:04d}")
        pairs.append({key: resolve(row.get(key)) for key in ("fixed", "moving", "fixed_mask", "moving_mask")})
        missing = [role for role in ("fixed", "moving") if not pairs[-1][role]]
        if missing:
            raise InvalidOptionError(f"{str(path)!r}, pair {names[-1]!r} (row {index + 1}): no {' and no '.join(missing)} "
                                     "image; each row names both.")
        landmarks.append((resolve(row.get("fixed_points")), resolve(row.get("moving_points"))))
        labels.append((resolve(row.get("fixed_labels")), resolve(row.get("moving_labels"))))
        if landmarks[-1][1] and not landmarks[-1][0]:
            raise InvalidOptionError(f"{str(path)!r}, pair {names[-1]!r}: moving_points without fixed_points; the "
                                     "error compares the fixed landmarks, moved, with the moving ones.")
        if labels[-1][0] and not labels[-1][1]:
            raise InvalidOptionError(f"{str(path)!r}, pair {names[-1]!r}: fixed_labels without moving_labels; the "
                                     "overlap compares the moving labels, warped, with the fixed ones.")
    bad = [n for n in names if Path(n).name != n or n in (".", "..")]
    if bad:
        raise InvalidOptionError(f"{str(path)!r}: a name must be a plain file name, without directories: {bad[0]!r}")
    first_of = {}  # names folded to lower case: macOS's and Windows' file systems do not tell case apart
    for name in names:
        other = first_of.setdefault(name.casefold(), name)
        if other == name and names.count(name) > 1:
            raise InvalidOptionError(f"{str(path)!r}: the name column repeats {name!r}; outputs would overwrite each "
                                     "other")
        if other != name:
            raise InvalidOptionError(f"{str(path)!r}: the names {other!r} and {name!r} differ only in case; on macOS "
                                     "and Windows file systems their outputs would overwrite each other: rename one")
    return names, pairs, landmarks, labels


_OPTIONAL_PAIR_COLUMNS = ("name", "fixed_mask", "moving_mask", "fixed_points", "moving_points", "fixed_labels",
                          "moving_labels")


def _read_landmarks(names, pairs, landmarks, in_voxels: bool, index_base):
    """Each pair's ``(_Landmarks, name of the output)`` (None where the CSV names no points), read
    before any registration so that a bad file stops the run first; errors name the pair. The
    moved points go to ``NAME_<the points file's name>``."""
    from pathlib import Path

    read = []
    for name, pair, (fixed_points, moving_points) in zip(names, pairs, landmarks):
        with _errors_named(name):
            images = (pair["fixed"], pair["moving"]) if in_voxels else None
            pair_landmarks = _Landmarks.read(fixed_points, moving_points, None, images, index_base) if fixed_points else None
        read.append((pair_landmarks, fixed_points and f"{name}_{Path(fixed_points).name}"))
    return read


@contextlib.contextmanager
def _errors_named(name: str):
    """A typed error raised inside, its message prefixed with the pair's name (where it does not
    name it already)."""
    from .errors import MgrEngineError, with_message

    try:
        yield
    except MgrEngineError as exc:
        if str(exc).startswith(f"pair {name!r}"):
            raise
        raise with_message(exc, f"pair {name!r}: {exc}") from exc


def _check_inputs_exist(names, pairs):
    """Raise :class:`ImageReadError` before any registration where a pair's image or mask does not
    exist: a path mistyped in the 80th row is not found after 79 registrations. (Whether ITK reads
    it is found when the pair is read.)"""
    from pathlib import Path

    for index, (name, pair) in enumerate(zip(names, pairs)):
        for role, path in pair.items():
            if path and not Path(path).exists():
                raise ImageReadError(f"pair {name!r} (row {index + 1}): {role.replace('_', ' ')} {path!r} does not "
                                     "exist; check the path (relative paths are taken from the pairs file's folder).")


def _check_labels(names, pairs, labels):
    """Each pair's label maps, checked before any registration: the fixed labels on the fixed
    image's grid (the overlap is counted voxel by voxel there), the moving labels readable, both up
    to their headers; a map of floating-point pixels read whole, its values whole numbers (a
    segmentation, not an intensity image in the wrong column). Errors name the pair."""
    from . import itk_io
    from .labels import label_array

    for name, pair, (fixed_labels, moving_labels) in zip(names, pairs, labels):
        with _errors_named(name):
            for role, path in (("moving labels", moving_labels), ("fixed labels", fixed_labels)):
                if not path:
                    continue
                grid = itk_io.load_image(path, role, grid_only=True)
                if role == "fixed labels":
                    itk_io.check_same_grid(grid, itk_io.load_image(pair["fixed"], "fixed", grid_only=True), role)
                if itk_io.has_float_voxels(path):
                    label_array(itk_io.load_image(path, role), f"{role} {path!r}")


def run_register_many(args) -> None:
    import json
    import time
    from pathlib import Path

    import itk
    import numpy as np
    from tqdm.auto import tqdm

    from . import itk_io
    from .labels import dice_before_and_after
    from .points import write_text
    from .resample import jacobian_summary

    if args.index_base is not None and not args.points_in_voxels:
        raise InvalidOptionError("--index_base needs --points_in_voxels")
    if args.physical_jacobian and not (args.jacobian_stats or args.jacobians):
        raise InvalidOptionError("--physical_jacobian needs --jacobian_stats or --jacobians")
    if args.displacement_fields and args.image_format == "mgz":
        raise InvalidOptionError("--image_format mgz cannot hold --displacement_fields (an MGH file holds scalar "
                                 "volumes); use nii.gz, which ANTs and ITK read as a field.")
    names, pairs, landmarks, labels = _read_pairs_csv(args.pairs)
    out_dir = Path(args.out_dir).absolute()  # as the pairs' paths
    kinds = ("transform", "inverse_transform") if args.inverse_transforms else ("transform",)
    transforms_there = [args.resume and all((out_dir / f"{name}_{kind}.h5").is_file() for kind in kinds)
                        for name in names]
    record = _read_record(out_dir, resume=any(transforms_there))
    recorded_inputs = record.get(_INPUTS_KEY) if isinstance(record.get(_INPUTS_KEY), dict) else None
    # a transform the record does not list was registered with other options (a run without
    # --resume replaced the record) or stopped before its record: registered again
    unrecorded = [name for name, there in zip(names, transforms_there)
                  if there and recorded_inputs is not None and name not in recorded_inputs]
    saved = [there and name not in unrecorded for name, there in zip(names, transforms_there)]
    without_inverse = [name for name, there in zip(names, transforms_there) if args.resume and not there
                       and (out_dir / f"{name}_transform.h5").is_file()]
    if without_inverse:
        log.info("--resume: registering again %s with a transform file but no inverse (%s, ...)",
                 _pairs(len(without_inverse)), without_inverse[0])
    if unrecorded:
        log.info("--resume: registering again %s whose transform %s does not list (%s, ...; registered with other "
                 "options, or stopped before their record)", _pairs(len(unrecorded)), _SETTINGS_FILE, unrecorded[0])
    if args.resume and any(saved) and not record:
        log.warning("--resume: %s is missing, so that the pairs registered there had the same model and options as "
                    "this run is not checked", out_dir / _SETTINGS_FILE)
    if all(saved):  # only evaluations from transform files: numpy and ITK, as the jacobian command
        itk_io.keep_itk_from_importing_torch()
    _check_inputs_exist(names, pairs)
    landmarks = _read_landmarks(names, pairs, landmarks, args.points_in_voxels, args.index_base)
    _check_labels(names, pairs, labels)
    settings = _registration_settings(
        args, saved, masked=any(pair["fixed_mask"] or pair["moving_mask"] for pair in pairs))
    if any(saved):
        _check_resumed_settings(settings, record, out_dir)
    resumed_inputs = _check_inputs_unchanged(names, pairs, saved, recorded_inputs or {}, out_dir)
    with _output_folder(out_dir):  # a folder this run created is removed where it stops before writing into it
        if args.warped or args.displacement_fields or args.jacobians or any(moving for _, moving in labels):
            itk_io.check_output_path(out_dir / f"{names[0]}_warped.{args.image_format}", "image")  # mgz: nibabel
        # the settings of the pairs registered from now on, what registered them, and each pair's inputs:
        # the records of the folder's other pairs are kept where they were registered with these settings
        kept_inputs = _records_kept(settings, record, recorded_inputs or {}, names, out_dir) if not all(saved) \
            else recorded_inputs or {}
        results = _registrations(args, names, pairs, saved, out_dir, settings.get("network_weights"))
        inputs = {**kept_inputs, **resumed_inputs}

        def write_record(head: dict):
            write_text(json.dumps({**head, _INPUTS_KEY: inputs}, indent=1) + "\n", out_dir / _SETTINGS_FILE)

        if not all(saved):  # written with the first pair's outputs: a run stopped before leaves the record as it was
            from . import __version__

            record = {**settings, "mgr_engine": __version__}
        elif inputs != recorded_inputs:  # only files touched or copied since (the same bytes): their new times
            write_record(record)
        started, first_done = time.perf_counter(), None  # the first pair's time includes loading the model, if any
        errors_by_pair = []  # (before, after): the target registration errors (mm) of each landmark
        tre_table = _Table(out_dir / "tre.csv", "name,landmarks,mean_before_mm,mean_after_mm,median_after_mm,max_after_mm")
        overlaps = []  # (before, after): each pair's Dice per label
        dice_table = _Table(out_dir / "dice.csv", "name,label,dice_before,dice_after")
        jacobian_table = _Table(out_dir / "jacobian.csv", "name,min,max,folds_percent,sd_log_jacobian")
        failed = []  # the names of the pairs --keep_going skipped
        for name, pair, result, (pair_landmarks, points_out), (fixed_labels, moving_labels) in tqdm(
                zip(names, pairs, results, landmarks, labels), total=len(names), desc="register-many", unit="pair",
                disable=args.quiet):
            # the pair's outputs: which of a data set's pairs failed
            with _skipped_if_keep_going(name, args.keep_going, failed), _errors_named(name):
                if isinstance(result, MgrEngineError):  # the engine's error for this pair, with --keep_going
                    raise result
                resumed = isinstance(result, _SavedRegistration)

                def image_path(kind):
                    return out_dir / f"{name}_{kind}.{args.image_format}"

                def wanted(option, kind):  # a resumed pair's image is kept where it is there (written atomically)
                    return option and not (resumed and image_path(kind).is_file())

                # computed before anything of the pair is written
                images = {"warped": result.warp() if wanted(args.warped, "warped") else None,
                          "displacement": result.displacement_field() if wanted(args.displacement_fields, "displacement")
                          else None}
                write_jacobian = wanted(args.jacobians, "jacobian")
                jacobian_image = (result.jacobian_determinant(args.physical_jacobian)
                                  if write_jacobian or args.jacobian_stats else None)
                images["jacobian"] = jacobian_image if write_jacobian else None
                moved = result.transform_points(pair_landmarks.points) if pair_landmarks is not None else None
                label_map = itk_io.load_image(moving_labels, "moving labels") if moving_labels else None
                images["warped_labels"] = result.warp(label_map, "nearest") if label_map is not None else None
                inverse = result.inverse_transform if args.inverse_transforms and not resumed else None
                overlap = None
                if fixed_labels:
                    overlap = dice_before_and_after(itk_io.load_image(fixed_labels, "fixed labels"), label_map,
                                                    images["warped_labels"])
                jacobian = jacobian_summary(itk.array_view_from_image(jacobian_image)) if args.jacobian_stats else None
                digests = None if resumed else _input_digests(name, pair)
                # the pair's files all or none; its record after its transform, which it describes
                outputs = [] if resumed else [(result.transform, out_dir / f"{name}_transform.h5")]
                if inverse is not None:
                    outputs.append((inverse, out_dir / f"{name}_inverse_transform.h5"))
                outputs += [(image, image_path(kind)) for kind, image in images.items() if image is not None]
                if moved is not None:
                    outputs.append((pair_landmarks.text_with(moved), out_dir / points_out))
                itk_io.write_outputs(outputs)
                if not resumed:
                    inputs[name] = digests
                    write_record(record)
                if jacobian is not None:
                    jacobian_table.add([f"{name}," + ",".join(repr(value) for value in jacobian)])
                if overlap is not None:
                    overlaps.append(overlap)
                    dice_table.add(f"{name},{label},{before!r},{overlap[1][label]!r}" for label, before in overlap[0].items())
                if pair_landmarks is not None and pair_landmarks.targets is not None:
                    before, after = pair_landmarks.errors_before, pair_landmarks.errors_after(moved)
                    errors_by_pair.append((before, after))
                    tre_table.add([f"{name},{len(after)}," + ",".join(
                        repr(float(v)) for v in (before.mean(), after.mean(), np.median(after), after.max()))])
                first_done = first_done or time.perf_counter()
        if len(failed) == len(names):  # nothing written: a folder this run created goes
            raise _skipped_pairs_error(failed, len(names))
    if errors_by_pair:
        before, after = (np.concatenate(errors) for errors in zip(*errors_by_pair))
        results_log.info("target registration error over %d landmarks of %s: mean %.2f mm before, %.2f mm "
                         "after (median %.2f, max %.2f)", len(after), _pairs(len(errors_by_pair)), before.mean(), after.mean(),
                         np.median(after), after.max())
    if overlaps:
        before, after = (np.mean([np.mean(list(dice.values())) for dice in dices]) for dices in zip(*overlaps))
        results_log.info("Dice over the labels of %s (mean of each pair's mean): %.3f before, %.3f after",
                         _pairs(len(overlaps)), before, after)
    elapsed = time.perf_counter() - started
    written = [done for name, done in zip(names, saved) if name not in failed]
    per_pair = (f": the first {first_done - started:.1f} s (start-up included), then "
                f"{(elapsed - (first_done - started)) / (len(written) - 1):.2f} s a pair") if len(written) > 1 else ""
    log.info("wrote the outputs of %s (%d registered, %d from their transform files) to %s in %.1f s%s",
             _pairs(len(written)), written.count(False), sum(written), out_dir, elapsed, per_pair)
    if failed:
        raise _skipped_pairs_error(failed, len(names))


@contextlib.contextmanager
def _skipped_if_keep_going(name: str, keep_going: bool, failed: list):
    """With ``keep_going`` (``--keep_going``), a pair's own typed error raised inside is logged and
    the pair's name added to ``failed``; otherwise, and for an output that cannot be written
    (which the next pairs' would meet too: a full disk), it is raised."""
    try:
        yield
    except OutputWriteError:
        raise
    except MgrEngineError as exc:
        if not keep_going:
            raise
        log.error("%s (skipped: --keep_going)", exc)
        failed.append(name)


def _skipped_pairs_error(failed: list, total: int) -> MgrEngineError:
    shown = ", ".join(repr(name) for name in failed[:5]) + (", ..." if len(failed) > 5 else "")
    return MgrEngineError(f"{len(failed)} of {_pairs(total)} failed and were skipped ({shown}; their errors are logged "
                          "above); the other pairs' outputs are written. Mend them and run again with --resume, which "
                          "registers only the pairs left.")


_SETTINGS_FILE = "register_many.json"


@contextlib.contextmanager
def _output_folder(out_dir):
    """Creates ``out_dir`` and its missing parents for the checks run inside; removes those it
    created where the checks refuse the run, so that a refused run leaves no empty folder."""
    created = [folder for folder in (out_dir, *out_dir.parents) if not folder.exists()]  # deepest first
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"cannot create the output directory {str(out_dir)!r} ({exc.strerror or exc})") from exc
    try:
        yield
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # something was written there after all
                break
        raise


def _read_record(out_dir, resume: bool) -> dict:
    """``OUT_DIR/register_many.json`` (the options its pairs were registered with, and under
    ``"inputs"`` each pair's :func:`_input_digests`), {} where there is none. Unreadable, it
    raises :class:`InvalidOptionError` where ``resume`` (a pair's transform is there to resume,
    which it could not check), and is otherwise replaced with a warning."""
    import json

    record_path = out_dir / _SETTINGS_FILE
    try:
        recorded = json.loads(record_path.read_text(encoding="utf-8"))
        if not isinstance(recorded, dict):
            raise ValueError(f"a JSON {type(recorded).__name__}, not an object")
        if recorded.get("io_iterations") is not None:  # written before --io_precision, whose IO was fp32
            recorded.setdefault("io_precision", "fp32")
        return recorded
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        if resume:
            raise InvalidOptionError(f"--resume: cannot read {str(record_path)!r} ({exc}), the record of the options "
                                     "the pairs there were registered with; delete it to resume unchecked") from exc
        log.warning("cannot read %s (%s); it is replaced with this run's record", record_path, exc)
        return {}


def _registration_settings(args, saved, masked: bool) -> dict:
    """What shapes register-many's registrations (model, the checkpoint's SHA-256, modalities,
    masking where ``masked`` (a pair has a mask), orientation matching, precision, IO's options),
    as ``OUT_DIR/register_many.json`` records it (with the version of mgr_engine that wrote it,
    which is not compared). The checkpoint is resolved and hashed only where a pair is left to
    register (otherwise it is not read, nor torch imported); options that change no registration
    (device, batching, compile) are not recorded."""
    import hashlib

    settings = {"model": args.model, "fixed_modality": args.fixed_modality, "moving_modality": args.moving_modality,
                "match_orientation": args.match_orientation, "precision": args.precision,
                "io_iterations": args.io_iterations}
    # --masking only where it changes a registration: pairs with masks, and input masking or IO
    if masked and (args.masking != "loss" or args.io_iterations is not None):
        settings["masking"] = args.masking
    if args.io_iterations is not None:
        settings.update(io_sim=args.io_sim, io_lr=args.io_lr, io_precision=args.io_precision, seed=args.seed)
    if not all(saved):
        from .engine import resolve_weights

        path = resolve_weights(args.model, args.network_weights)
        digest = hashlib.sha256()
        _hash_file(digest, path)  # 0.3 s for the official checkpoint's 283 MB
        settings.update(network_weights=str(path.resolve()), weights_sha256=digest.hexdigest())
    return settings


def _check_resumed_settings(settings: dict, record: dict, out_dir) -> None:
    """Raise :class:`InvalidOptionError` where ``--resume``'s ``settings`` differ from those the
    pairs in ``out_dir`` were registered with (``record``): a data set's table of one model's
    results, not of two. A resumed folder without a record (an earlier version's) is not checked."""
    # where IO is on in one run only, io_iterations tells it; the other IO options are not listed
    changed = [key for key, value in settings.items() if key != "network_weights" and key in record
               and record[key] != value]
    if changed:
        differences = [f"{key}={record[key]!r}, not {settings[key]!r} as now" + (
            f" (their checkpoint: {record.get('network_weights')!r})" if key == "weights_sha256" else "")
            for key in changed]
        raise InvalidOptionError(
            f"--resume: the pairs in {str(out_dir)!r} were registered with {'; '.join(differences)} "
            f"({_SETTINGS_FILE}); give the same options to resume, or register into another --out_dir")


def _records_kept(settings: dict, record: dict, recorded_inputs: dict, names, out_dir) -> dict:
    """The input records of ``recorded_inputs`` that a run registering with ``settings`` keeps in
    ``OUT_DIR/register_many.json``: all of them where the folder's pairs were registered with the
    same settings (every one, strictly), none otherwise, as its record will state this run's
    settings: a later ``--resume`` then registers the folder's other pairs again rather than take
    their transforms for this run's. Those dropped are logged."""
    def compared(options):
        return {key: value for key, value in options.items() if key not in _NOT_SETTINGS}

    if compared(settings) == compared(record):
        return recorded_inputs
    left_out = [name for name in recorded_inputs if name not in names and (out_dir / f"{name}_transform.h5").is_file()]
    if left_out:
        log.warning("%s in %s that this table does not list (%s, ...) had been registered with other options; %s "
                    "now records this run's, so --resume would register them again", _pairs(len(left_out)), out_dir,
                    left_out[0], _SETTINGS_FILE)
    return {}


_INPUTS_KEY = "inputs"  # in register_many.json: each registered pair's _input_digests
_NOT_SETTINGS = ("network_weights", "mgr_engine", _INPUTS_KEY)  # in register_many.json: not compared


def _input_digests(name: str, pair: dict, known: dict | None = None) -> dict:
    """``{role: {"size", "mtime_ns", "sha256"}}`` of the files the pair ``name`` was registered
    from (its images and masks; a DICOM folder with its files, a ``.mhd`` or ``.hdr`` header with
    its voxel file, a DICOM file with its folder's files), so that ``--resume`` can tell a
    transform computed from other voxels on the same grid. A file whose size and modification
    time match ``known``'s record is not read again (a resumed data set of CTs is not hashed whole
    on each run); a copy or a touch is read and compared. Raises :class:`ImageReadError` where a
    file cannot be read (gone since the pair was registered, say)."""
    try:
        return _read_input_digests(pair, known or {})
    except OSError as exc:
        raise ImageReadError(f"pair {name!r}: cannot read {exc.filename!r} ({exc.strerror or exc}) to record what it "
                             "was registered from; put the file back, or register the pair again") from exc


def _read_input_digests(pair: dict, known: dict) -> dict:
    import hashlib
    from pathlib import Path

    from .itk_io import image_files

    digests = {}
    for role in ("fixed", "moving", "fixed_mask", "moving_mask"):
        if not pair.get(role):
            continue
        folder = Path(pair[role]).is_dir()
        files = image_files(pair[role])
        stats = [f.stat() for f in files]
        record = {"size": sum(s.st_size for s in stats), "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}
        previous = known.get(role)
        if isinstance(previous, dict) and all(previous.get(key) == value for key, value in record.items()):
            digests[role] = previous
            continue
        digest = hashlib.sha256()
        for file in files:
            if folder:  # a slice renamed is another series
                digest.update(file.name.encode() + b"\0")
            _hash_file(digest, file)
        digests[role] = {**record, "sha256": digest.hexdigest()}
    return digests


def _hash_file(digest, path) -> None:
    """Feed the bytes of the file ``path`` to the hashlib object ``digest``, 4 MiB at a time."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)


def _check_inputs_unchanged(names, pairs, saved, recorded: dict, out_dir) -> dict:
    """Raise :class:`InvalidOptionError` where a resumed pair's input files are not those its
    transform was computed from (their SHA-256 differs from ``recorded``'s; a mask added or
    removed counts): a segmentation re-run or an image re-exported on the same grid would
    otherwise be judged through a stale transform. Pairs without a record (an earlier version's
    folder) are taken as they are. Returns the resumed pairs' records as they are now: a file
    touched or copied since (the same bytes, a new modification time) is recorded with its new
    time, so that the next resume does not hash it again."""
    current_records = {}
    for name, pair, done in zip(names, pairs, saved):
        record = recorded.get(name)
        if not done or not isinstance(record, dict):
            continue
        current = current_records[name] = _input_digests(name, pair, record)
        changed = sorted(role for role in current.keys() | record.keys()
                         if (current.get(role) or {}).get("sha256") != (record.get(role) or {}).get("sha256"))
        if changed:
            raise InvalidOptionError(
                f"--resume: pair {name!r}: its {' and '.join(role.replace('_', ' ') for role in changed)} "
                f"{'is' if len(changed) == 1 else 'are'} not the file{'s' * (len(changed) > 1)} "
                f"{str(out_dir / f'{name}_transform.h5')!r} was computed from (another SHA-256 than "
                f"{_SETTINGS_FILE} records); delete that file to register the pair again, or run without --resume.")
    return current_records


def _registrations(args, names, pairs, saved, out_dir, weights):
    """Each pair's registration, in order (an iterator): the engine's result, or where ``saved``
    (``--resume``, and the pair's transform file in ``out_dir`` already) that file read back
    (:class:`_SavedRegistration`). The engine is built, ``weights`` (the checkpoint file
    :func:`_registration_settings` resolved and hashed) loaded and its options checked now, only
    if a pair is left to register: before anything is written, so that a checkpoint of another
    architecture or an option out of range leaves the folder as it was."""
    if any(saved):
        log.info("--resume: %d of %s registered by an earlier run, evaluated from their transform files",
                 sum(saved), _pairs(len(names)))
    left = [pair for pair, done in zip(pairs, saved) if not done]
    results = iter(())
    if left:
        from .engine import Engine  # torch with it: not imported where every pair is done

        engine = Engine(model=args.model, weights=weights, device=args.device, precision=args.precision,
                        compile=args.compile)
        results = engine.register_many(
            left, batch_size=args.batch_size, prefetch=args.prefetch, fixed_modality=args.fixed_modality,
            moving_modality=args.moving_modality, io_iterations=args.io_iterations, io_sim=args.io_sim,
            io_lr=args.io_lr, io_precision=args.io_precision, masking=args.masking, progress=False, seed=args.seed,
            match_orientation=args.match_orientation, on_error="yield" if args.keep_going else "raise")
    return _in_table_order(names, pairs, saved, out_dir, results)


def _in_table_order(names, pairs, saved, out_dir, results):
    """:func:`_registrations`' iterator: the engine's ``results`` for the pairs left, a saved
    pair's transform file read back in its row; an engine error (raised, or yielded in the pair's
    place with ``--keep_going``) named by the pair's row."""
    import re

    from .errors import with_message

    def named(exc, name, index):  # as the CSV names the pair (the engine counts the pairs it was given)
        return with_message(exc, f"pair {name!r} (row {index + 1}): {re.sub(r'^pair [0-9]+: ', '', str(exc))}")

    for index, (name, pair, done) in enumerate(zip(names, pairs, saved)):
        if done:
            yield _SavedRegistration(out_dir / f"{name}_transform.h5", pair, name)
            continue
        try:
            result = next(results)
        except MgrEngineError as exc:
            raise named(exc, name, index)  # caused by exc
        yield named(result, name, index) if isinstance(result, MgrEngineError) else result


_GRID_TOLERANCE_MM = 1e-3  # NIfTI headers hold the geometry in float32: about 1e-5 mm apart after a round trip


class _SavedRegistration:
    """A pair's registration read back from its transform file, with what register-many asks of a
    :class:`mgr_engine.RegistrationResult`, computed as the warp, jacobian and transform-points
    commands compute them from a file."""

    def __init__(self, transform_path, pair: dict, name: str):
        from . import itk_io

        self.transform = itk_io.read_transform(transform_path)
        self._pair = pair
        self._field = None
        self._check_images(transform_path, name)

    def _check_images(self, transform_path, name: str) -> None:
        """Raise :class:`InvalidOptionError` where the file is a registration's transform (of this
        engine's form) computed for other images: its affines place the network grid over the
        fixed and the moving image's extents, which the pair's images (their headers) must give
        again. Other transforms are taken as they are."""
        import numpy as np

        from . import itk_io
        from .resample import invert_affine

        grid = itk_io.grid_transform(self.transform)
        if grid is None:
            return
        shape = grid.displacement.shape[:3]
        for role, affine in (("fixed", invert_affine(grid.to_grid)), ("moving", grid.from_grid)):
            image = itk_io.load_image(self._pair[role], role, grid_only=True)
            if not np.allclose(affine, itk_io.network_to_physical_affine(image, shape), rtol=0, atol=_GRID_TOLERANCE_MM):
                raise InvalidOptionError(
                    f"pair {name!r}: {str(transform_path)!r} was computed for another {role} image than "
                    f"{self._pair[role]!r} (its grid differs); delete the file to register the pair again, or run "
                    "without --resume.")

    def warp(self, image=None, interpolation: str = "linear"):
        return _warped(self.transform, self._pair["moving"] if image is None else image, self._pair["fixed"],
                       interpolation)

    def transform_points(self, points):
        from .points import transform_points

        return transform_points(self.transform, points)

    def displacement_field(self):
        """Computed once, kept for :meth:`jacobian_determinant` (as the engine's result does)."""
        if self._field is None:
            self._field = _displacement_field(self.transform, self._pair["fixed"])
        return self._field

    def jacobian_determinant(self, physical: bool = False):
        from . import itk_io

        if self._field is not None:  # the same voxels as slab by slab, without a second field
            return itk_io.jacobian_determinant(self._field, physical)
        return _jacobian_image(self.transform, self._pair["fixed"], physical)


class _Table:
    """A CSV file of register-many's rows, rewritten (atomically) after each pair's: a run stopped
    by a later pair keeps the rows of the pairs before it."""

    def __init__(self, path, header: str):
        self.path, self.lines = path, [header]

    def add(self, rows) -> None:
        from .points import write_text

        self.lines.extend(rows)
        write_text("".join(line + "\n" for line in self.lines), self.path)


def _add_export(sub):
    p = sub.add_parser("export-onnx", help="export the network as ONNX graphs (full, or one per U-Net for TensorRT)")
    p.add_argument("--out", required=True, help="kind full: the .onnx file; kind stages: a directory for psi1..psi4.onnx")
    p.add_argument("--kind", default="full", choices=["full", "stages"],
                   help="full: (moving, fixed) -> map with the warps (opset >= 20); stages: each U-Net alone")
    p.add_argument("--model", default="multigradicon", choices=["unigradicon", "multigradicon", "compact"],
                   help="compact: the bundled model (64^3)")
    p.add_argument("--network_weights", help="checkpoint (Step_2_final.trch, or a .safetensors file of mgr-engine "
                                             "train, with its network); default: see README, nothing is downloaded")
    p.add_argument("--opset", type=int, help="ONNX opset (default 20 for full, 17 for stages)")
    p.add_argument("--fp16", action="store_true", help="float16 U-Nets (full: maps and warps stay float32)")
    p.add_argument("--batch", type=int, default=1, help="static batch size of the inputs (default 1)")
    p.add_argument("--no_cpu_rewrites", action="store_true",
                   help="full graph: keep ConvTranspose and the 3-D last convolution (by default rewritten into the "
                        "forms ONNX Runtime's CPU provider runs fast)")
    p.add_argument("--network_input_shape", nargs=3, type=int, metavar=("D", "H", "W"),
                   help="input shape of a non-official network configuration (default 175 175 175; "
                        "at least 65 voxels per axis for U-Nets of the official depth)")
    p.set_defaults(run=run_export)


def _add_warp(sub):
    p = sub.add_parser("warp", help="warp an image with a transform (unigradicon-warp's flags)")
    p.add_argument("--fixed", required=True, help="image whose grid the output takes")
    p.add_argument("--moving", required=True, help="image to warp")
    p.add_argument("--transform", help="transform file (.h5, .tfm) or displacement field image (.nii.gz, .nrrd, .mha); "
                                       "identity if omitted")
    p.add_argument("--warped_moving_out", required=True)
    p.add_argument("--nearest_neighbor", action="store_true")
    p.add_argument("--linear", action="store_true")
    p.set_defaults(run=run_warp)


def _add_jacobian(sub):
    p = sub.add_parser("jacobian", help="Jacobian map of a transform (unigradicon-jacobian's flags)")
    p.add_argument("--transform", required=True, help="transform file (.h5, .tfm) or displacement field image")
    p.add_argument("--fixed", required=True, help="the fixed image used in the registration")
    p.add_argument("--jacob", required=True, help="output Jacobian determinant image")
    p.add_argument("--log_jacob", help="output log-Jacobian image")
    p.add_argument("--physical_jacobian", action="store_true", help=PHYSICAL_JACOBIAN_HELP)
    p.set_defaults(run=run_jacobian)


def _add_dice(sub):
    p = sub.add_parser("dice", help="overlap (Dice) of the fixed and the moving segmentation before and after a "
                                    "transform",
                       description="Warp the moving image's segmentation onto the fixed one's grid through a "
                                   "transform (register's --transform_out; nearest neighbour) and log the Dice of "
                                   "each label of the fixed segmentation (0, the background, excluded) before (the "
                                   "identity in physical space) and after.")
    p.add_argument("--transform", required=True, help="transform file (.h5, .tfm) or displacement field image: fixed "
                                                      "point -> moving point")
    p.add_argument("--fixed_labels", required=True, help="segmentation of the fixed image, on its grid")
    p.add_argument("--moving_labels", required=True, help="segmentation of the moving image")
    p.add_argument("--dice_out", help="output CSV: label, dice_before, dice_after")
    p.add_argument("--warped_labels_out", help="output: the moving segmentation on the fixed grid")
    p.set_defaults(run=run_dice)


def _add_transform_points(sub):
    p = sub.add_parser("transform-points", help="move points (landmarks) of the fixed image into moving space through "
                                                "a transform",
                       description="Map each point of a points file through a transform (register's "
                                   "--transform_out: fixed-space point -> moving-space point, mm), as ITK's "
                                   "TransformPoint does. The file is a table, one point per row: a header naming x, y, "
                                   "z (or r, a, s) columns, or x, y, z first; comment lines start with #. 3D "
                                   "Slicer's .mrk.json and .fcsv and ANTs' CSV read as they are. The output keeps the "
                                   "file's layout, other columns and coordinate system, with the moved coordinates.")
    p.add_argument("--transform", required=True, help="transform file (.h5, .tfm) or displacement field image")
    p.add_argument("--points", required=True, help="points file (.csv, .txt, .fcsv, .mrk.json)")
    p.add_argument("--points_out", required=True, help="output points file, in the input's layout")
    p.add_argument("--coordinate_system", choices=["LPS", "RAS"],
                   help="coordinates of a file that does not declare its own (default LPS, ITK's and the images' "
                        "origins'; 3D Slicer uses RAS)")
    p.add_argument("--target_points",
                   help="the moving image's landmarks, row for row: logs the target registration error before and "
                        "after (mm)")
    p.add_argument("--tre_out", help="with --target_points: a CSV of each landmark's error before and after (mm)")
    p.add_argument("--voxel_indices", nargs=2, metavar=("FIXED", "MOVING"),
                   help="--points hold continuous voxel indices (i, j, k: a NIfTI file's voxel axes, nibabel's array "
                        "axes) of the image FIXED, --target_points and --points_out those of MOVING, as DIR-Lab's and "
                        "Learn2Reg's landmark tables; errors stay in mm")
    p.add_argument("--index_base", type=int, choices=[0, 1],
                   help=_INDEX_BASE_HELP)
    p.set_defaults(run=run_transform_points)


def check_outputs(outputs) -> None:
    """Refuse, before any work, outputs that could not be written or would overwrite each other:
    ``outputs`` lists ``(option, path, kind)`` for each output option, ``path`` None when not given,
    ``kind`` ``"image"``, ``"field"`` (a displacement field), ``"transform"`` or ``"text"``."""
    from pathlib import Path

    from . import itk_io

    given = [(option, Path(path), kind) for option, path, kind in outputs if path]
    for option, path, kind in given:
        try:
            itk_io.check_output_path(path, kind)
        except OutputWriteError as exc:
            raise OutputWriteError(f"{option}: {exc}") from None
    files = {}
    for option, path, _ in given:
        if path.resolve() in files:
            raise InvalidOptionError(f"{files[path.resolve()]} and {option} name the same file {str(path)!r}; "
                                     "one output would overwrite the other.")
        files[path.resolve()] = option


def run_register(args) -> None:
    from . import itk_io
    from .engine import Engine, check_io_lr
    from .model import NetworkConfig

    if args.fixed_segmentation or args.moving_segmentation or args.dice_loss_weight or args.intensity_conservation_loss:
        raise InvalidOptionError(
            "--fixed_segmentation/--moving_segmentation/--dice_loss_weight/--intensity_conservation_loss are not "
            "supported by mgr-engine; for masking use --fixed_mask/--moving_mask with --input_masking or "
            "--loss_function_masking.")
    check_io_lr(args.io_lr)  # before the model is loaded
    modalities = {str(args.fixed_modality).lower(), str(args.moving_modality).lower()}
    for option, modality in (("ct_window", "ct"), ("quantile_range", "mri")):
        if getattr(args, option) and modality not in modalities:  # the reference ignores it without a word
            log.warning("--%s is not used: it normalizes '%s' images, and neither --fixed_modality nor "
                        "--moving_modality is %s", option, modality, modality)
    if (args.input_masking or args.loss_function_masking) and not (args.fixed_mask or args.moving_mask):
        raise InvalidOptionError("--input_masking/--loss_function_masking need --fixed_mask and/or --moving_mask")
    masking = {(True, True): "both", (True, False): "input", (False, True): "loss"}.get(
        (args.input_masking, args.loss_function_masking))
    use_masks = masking is not None
    if not use_masks and (args.fixed_mask or args.moving_mask):  # unigradicon-register ignores them without a word
        log.warning("--fixed_mask/--moving_mask are not used without --input_masking or --loss_function_masking "
                    "(as unigradicon-register); pass one of them to use the masks")
    config = None  # the model's own (a .safetensors file carries its configuration)
    if args.network_input_shape:
        config = NetworkConfig(input_shape=tuple(args.network_input_shape))
    if args.backend != "onnxruntime" and (args.onnx_model or args.onnx_providers):
        raise InvalidOptionError("--onnx_model/--onnx_providers need --backend onnxruntime")
    check_outputs([("--transform_out", args.transform_out, "transform"),
                   ("--inverse_transform_out", args.inverse_transform_out, "transform"),
                   ("--warped_moving_out", args.warped_moving_out, "image"),
                   ("--displacement_field_out", args.displacement_field_out, "field"),
                   ("--jacobian_out", args.jacobian_out, "image")])
    engine = Engine(model=args.model, weights=args.network_weights, device=args.device, config=config,
                    backend=args.backend, onnx_model=args.onnx_model, onnx_providers=args.onnx_providers,
                    precision=args.precision, io_checkpointing=args.io_checkpointing, compile=args.compile)
    result = engine.register(
        args.fixed, args.moving, fixed_modality=args.fixed_modality, moving_modality=args.moving_modality,
        io_iterations=args.io_iterations, io_sim=args.io_sim, io_lr=args.io_lr, io_precision=args.io_precision,
        fixed_mask=args.fixed_mask if use_masks else None, moving_mask=args.moving_mask if use_masks else None,
        masking=masking or "loss", ct_window=args.ct_window, quantile_range=args.quantile_range, seed=args.seed,
        match_orientation=args.match_orientation, progress=not args.quiet)
    # Every output computed, then written all or none: a failure leaves nothing behind.
    outputs = [(result.transform, args.transform_out)]
    if args.inverse_transform_out:
        outputs.append((result.inverse_transform, args.inverse_transform_out))
    if args.warped_moving_out:
        outputs.append((result.warp(), args.warped_moving_out))
    if args.displacement_field_out:
        outputs.append((result.displacement_field(), args.displacement_field_out))
    if args.jacobian_out:
        jacobian = result.jacobian_determinant(args.physical_jacobian)
        outputs.append((jacobian, args.jacobian_out))
        _log_jacobian_summary(jacobian)  # as the jacobian command: the folds are the first thing looked at
    itk_io.write_outputs(outputs)
    log.info("wrote %s", ", ".join(str(path) for _, path in outputs))


def run_export(args) -> None:
    from .export import export_onnx
    from .model import NetworkConfig

    config = None  # the model's, or a .safetensors file's own
    if args.network_input_shape:
        config = NetworkConfig(input_shape=tuple(args.network_input_shape))
    written = export_onnx(args.out, model=args.model, weights=args.network_weights, kind=args.kind, opset=args.opset,
                          dtype="float16" if args.fp16 else "float32", config=config, batch=args.batch,
                          cpu_rewrites=False if args.no_cpu_rewrites else None)
    for path in written:
        log.info("wrote %s", path)


def run_warp(args) -> None:
    from . import itk_io

    itk_io.keep_itk_from_importing_torch()  # C++ kernels on numpy arrays: torch only where they were not built
    if args.linear == args.nearest_neighbor:
        raise InvalidOptionError("specify exactly one of --linear or --nearest_neighbor")
    check_outputs([("--warped_moving_out", args.warped_moving_out, "image")])
    transform = itk_io.read_transform(args.transform) if args.transform else itk_io.identity_transform()
    interpolation = "linear" if args.linear else "nearest"
    warped = _warped(transform, args.moving, args.fixed, interpolation)
    itk_io.write_image(warped, args.warped_moving_out)


def run_dice(args) -> None:
    import numpy as np

    from . import itk_io
    from .labels import dice_before_and_after

    itk_io.keep_itk_from_importing_torch()  # as in run_warp
    check_outputs([("--dice_out", args.dice_out, "text"), ("--warped_labels_out", args.warped_labels_out, "image")])
    transform = itk_io.read_transform(args.transform)
    fixed_labels = itk_io.load_image(args.fixed_labels, "fixed labels")
    moving_labels = itk_io.load_image(args.moving_labels, "moving labels")
    warped = _warped(transform, moving_labels, fixed_labels, "nearest")
    before, after = dice_before_and_after(fixed_labels, moving_labels, warped)
    if len(after) <= _LABELS_LOGGED_ONE_BY_ONE:
        for label, dice in after.items():
            results_log.info("label %d: Dice %.3f before, %.3f after", label, before[label], dice)
    worst = min(after, key=after.get)
    results_log.info("Dice over %d labels: mean %.3f before, %.3f after (lowest after: label %d, %.3f)", len(after),
                     np.mean(list(before.values())), np.mean(list(after.values())), worst, after[worst])
    outputs = [(warped, args.warped_labels_out)] if args.warped_labels_out else []
    if args.dice_out:
        outputs.append(("label,dice_before,dice_after\n" + "".join(
            f"{label},{before[label]!r},{dice!r}\n" for label, dice in after.items()), args.dice_out))
    itk_io.write_outputs(outputs)  # computed first, then written all or none


_LABELS_LOGGED_ONE_BY_ONE = 12  # more go to --dice_out only


def _grid_and_fixed(transform, fixed):
    """``(grid, fixed)``: ``transform`` as arrays where it is a registration's (evaluated in C++,
    not point by point by ITK), else None; and the fixed image (a path or an image), which gives
    an output's grid: its voxels are read only for ITK's filters (grid None)."""
    from . import itk_io

    grid = itk_io.grid_transform(transform)
    return grid, itk_io.load_image(fixed, "fixed", grid_only=grid is not None)


def _warped(transform, moving, fixed, interpolation: str):
    """The image ``moving`` resampled onto the grid of ``fixed`` (each a path or an image) through
    ``transform``."""
    from . import itk_io
    from .labels import warn_if_linear_on_labels

    grid, fixed = _grid_and_fixed(transform, fixed)
    moving = itk_io.load_image(moving, "moving")
    warn_if_linear_on_labels(moving, interpolation)
    if grid is not None:
        return itk_io.warp_image(grid, moving, fixed, interpolation)
    return itk_io.resample(moving, transform, fixed, interpolation)


def run_jacobian(args) -> None:
    from . import itk_io

    itk_io.keep_itk_from_importing_torch()  # as in run_warp
    check_outputs([("--jacob", args.jacob, "image"), ("--log_jacob", args.log_jacob, "image")])
    jacobian = _jacobian_image(itk_io.read_transform(args.transform), args.fixed, args.physical_jacobian)
    outputs = [(jacobian, args.jacob)]
    if args.log_jacob:
        outputs.append((_log_image(jacobian), args.log_jacob))
    _log_jacobian_summary(jacobian)
    itk_io.write_outputs(outputs)


def _log_jacobian_summary(jacobian) -> None:
    """The Jacobian determinant image's summary in the results' log: how much the transform folds."""
    import itk

    from .resample import jacobian_summary

    results_log.info("Jacobian determinant: min %.3f, max %.3f; %.4f %% of the voxels at or below 0 (folds); SD of "
                     "its log %.4f (where above 0)", *jacobian_summary(itk.array_view_from_image(jacobian)))


def _displacement_field(transform, fixed):
    """The displacement field (mm) of ``transform`` on the grid of ``fixed`` (a path or an image)."""
    from . import itk_io

    grid, fixed = _grid_and_fixed(transform, fixed)
    if grid is not None:
        return itk_io.grid_displacement_field(grid, fixed)
    return itk_io.transform_to_displacement_field(transform, fixed)


def _jacobian_image(transform, fixed, physical: bool):
    """The Jacobian determinant of ``transform`` on the grid of ``fixed`` (a path or an image)."""
    from . import itk_io

    grid, fixed = _grid_and_fixed(transform, fixed)
    if grid is not None:  # slab by slab: no 900 MB field at 512x512x300
        return itk_io.grid_jacobian_determinant(grid, fixed, physical)
    field = itk_io.transform_to_displacement_field(transform, fixed)
    return itk_io.jacobian_determinant(field, physical)  # the 900 MB field (512x512x300) freed on return


def run_transform_points(args) -> None:
    import numpy as np

    from . import itk_io
    from .points import transform_points

    itk_io.keep_itk_from_importing_torch()  # as in run_warp: numpy and ITK's transform only
    if args.tre_out and not args.target_points:
        raise InvalidOptionError("--tre_out needs --target_points (the moving image's landmarks)")
    if args.index_base is not None and not args.voxel_indices:
        raise InvalidOptionError("--index_base needs --voxel_indices (the images whose voxel indices the files hold)")
    check_outputs([("--points_out", args.points_out, "text"), ("--tre_out", args.tre_out, "text")])
    landmarks = _Landmarks.read(args.points, args.target_points, args.coordinate_system, args.voxel_indices,
                                args.index_base)
    moved = transform_points(itk_io.read_transform(args.transform), landmarks.points)
    outputs = [(landmarks.text_with(moved), args.points_out)]
    if landmarks.targets is not None:
        before, after = landmarks.errors_before, landmarks.errors_after(moved)
        if len(after) < len(moved):
            log.info("%d of %d landmarks are not placed in one of the files (3D Slicer): left out of the error",
                     len(moved) - len(after), len(moved))
        for name, errors in (("before registration", before), ("after registration", after)):
            results_log.info("target registration error %s over %d landmarks: mean %.2f mm (SD %.2f), median %.2f, "
                             "max %.2f", name, len(errors), errors.mean(), errors.std(), np.median(errors),
                             errors.max())
        if args.tre_out:
            outputs.append(("landmark,before_mm,after_mm\n" + "".join(
                f"{i},{b!r},{a!r}\n" for i, b, a in zip(landmarks.counted.tolist(), before.tolist(), after.tolist())),
                args.tre_out))
    itk_io.write_outputs(outputs)  # computed first, then written all or none
    log.info("moved %d points into %s", len(moved), args.points_out)


class _Landmarks:
    """A points file and, optionally, its target points, read for transform-points and
    register-many: ``points`` and ``targets`` in LPS mm; where there are targets, ``counted``
    (the landmarks placed in both files; 3D Slicer's lists keep points not placed yet) and
    ``errors_before`` (mm, of the counted landmarks), for :meth:`errors_after`; :meth:`text_with`
    writes the moved points in the file's layout. Where the files hold voxel indices, ``images``
    names the fixed and the moving image whose indices they are (the points file's are the fixed
    image's; the targets' and the moved points' the moving image's)."""

    def __init__(self, points_file, points, targets_file, targets, moving_grid, index_base):
        import numpy as np

        from .errors import InvalidPointsError
        from .points import landmark_distances

        self.points_file, self.points, self.targets = points_file, points, targets
        self._moving_grid, self._index_base = moving_grid, index_base
        self.counted = self.errors_before = None
        if targets is not None:
            before = landmark_distances(points, targets)  # checks the counts before any registration
            self.counted = np.flatnonzero(points_file.placed & targets_file.placed)
            if not len(self.counted):
                raise InvalidPointsError("no landmark is placed in both points files; place them in 3D Slicer first")
            self.errors_before = before[self.counted]

    @classmethod
    def read(cls, points, target_points=None, coordinate_system=None, images=None, index_base=None):
        from . import itk_io
        from .points import indices_to_points, read_points

        voxels = images is not None
        points_file = read_points(points, coordinate_system, voxel_indices=voxels)
        targets_file = read_points(target_points, coordinate_system, voxel_indices=voxels) if target_points else None
        targets = targets_file.points if targets_file else None
        if not voxels:
            return cls(points_file, points_file.points, targets_file, targets, None, None)
        fixed_grid, moving_grid = (itk_io.load_image(path, name, grid_only=True)
                                   for name, path in zip(("fixed", "moving"), images))
        index_base = index_base or 0
        if targets is not None:
            targets = indices_to_points(targets, moving_grid, index_base)
        return cls(points_file, indices_to_points(points_file.points, fixed_grid, index_base), targets_file, targets,
                   moving_grid, index_base)

    def errors_after(self, moved):
        """The counted landmarks' errors (mm) with the ``moved`` points."""
        from .points import landmark_distances

        return landmark_distances(moved, self.targets)[self.counted]

    def text_with(self, moved) -> str:
        """The points file's text with the ``moved`` points (LPS mm), as voxel indices of the moving
        image where the file holds voxel indices."""
        from .points import points_to_indices

        if self._moving_grid is not None:
            moved = points_to_indices(moved, self._moving_grid, self._index_base)
        return self.points_file.text_with(moved)


def _log_image(image, slab_voxels: int = 2**22):
    """The natural log of a float ``itk.Image``, as ITK's ``LogImageFilter`` computes it (``std::log``
    in double, NaN below 0, then rounded to float); that filter would load ITKImageIntensity (4 s).

    Slab by slab through one float64 buffer: the whole image cast to float64 and its log (two
    new 600 MB arrays at 512x512x300) took 11 s of page faults and copies, the slabs 1 s."""
    import itk
    import numpy as np

    from . import itk_io

    values = itk.array_view_from_image(image)
    log_image, log_values = itk_io.new_image(values.shape, np.float32, image)
    slab = max(1, slab_voxels // max(1, values[0].size))  # default: 4 M voxels, a 32 MB buffer
    buffer = np.empty((slab, *values.shape[1:]), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, values.shape[0], slab):
            part = buffer[:len(values[start:start + slab])]
            np.log(values[start:start + slab], out=part, dtype=np.float64)
            log_values[start:start + slab] = part  # rounded to float32
    return log_image


def _add_train(sub):
    p = sub.add_parser("train", help="train (or resume) a model with the multiGradICON recipe on synthetic patients",
                       description="Train with GradICON + 1-LNCC^2 and similarity-loss randomization on synthetic "
                                   "patients (mgr_engine.train). A run directory with a checkpoint resumes; then only "
                                   "--steps, --lr and the save/log/eval frequencies may change. Writes RUN_DIR/"
                                   "checkpoint.pt, RUN_DIR/compact.safetensors (for Engine(weights=...)) and "
                                   "RUN_DIR/log.jsonl. Options left out take the stored (resume) or default values.")
    p.add_argument("--run_dir", required=True, help="directory of the run's checkpoint, weights and log")
    p.add_argument("--steps", type=int, help="train up to this many steps in all (default 20000)")
    p.add_argument("--input_shape", nargs=3, type=int, metavar=("D", "H", "W"), help="network input (default 64 64 64)")
    p.add_argument("--down_channels", nargs="+", type=int, help="U-Net down channels (default the compact model's)")
    p.add_argument("--up_channels", nargs="+", type=int, help="U-Net up channels (default the compact model's)")
    p.add_argument("--last_unet_from", type=int,
                   help="step at which the last U-Net joins (two-stage training as the reference; default 0)")
    p.add_argument("--batch_size", type=int, help="pairs per step (default 4)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 5e-5, the reference's)")
    p.add_argument("--lmbda", type=float, help="GradICON weight (default 1.5)")
    p.add_argument("--similarity", choices=["lncc2", "lncc", "mind"], help="training similarity (default lncc2)")
    p.add_argument("--variant", choices=["B", "F", "R", "mono"],
                   help="similarity-loss randomization: B, F, R (default) or mono (monomodal pairs only)")
    p.add_argument("--shapes_fraction", type=float, help="share of SynthMorph-like shape pairs (default 0.25)")
    p.add_argument("--ct", action="store_const", const=True,
                   help="brain patients also get a CT-like contrast and its inversion 1 - CT (paper's augmentation)")
    p.add_argument("--no_augment", dest="augment", action="store_const", const=False,
                   help="no random affine/flip augmentation")
    p.add_argument("--amp", action="store_const", const=True, help="bfloat16 autocast for the U-Nets (CUDA)")
    p.add_argument("--seed", type=int, help="seed of the run's random generator (default 0)")
    p.add_argument("--save_every", type=int, help="checkpoint every N steps (default 200)")
    p.add_argument("--log_every", type=int, help="log every N steps (default 10)")
    p.add_argument("--eval_every", type=int, help="held-out T1/T2 Dice every N steps (default 0: never)")
    p.add_argument("--eval_pairs", type=int, help="held-out pairs per evaluation (default 2)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max_minutes", type=float, help="save and stop after this much wall time")
    p.add_argument("--init_weights", help="a new run starts from these .safetensors weights (e.g. the bundled "
                                          "compact model's) with a fresh optimizer")
    p.set_defaults(run=run_train)


def run_train(args) -> None:
    import dataclasses

    from .train import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.input_shape:
        options["input_shape"] = tuple(args.input_shape)
    for key in ("down_channels", "up_channels"):
        if key in options:
            options[key] = tuple(options[key])
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise InvalidOptionError(f"--max_minutes {args.max_minutes:g}: give a positive wall time")
    last = train(args.run_dir, options, device=args.device,
                 max_seconds=None if args.max_minutes is None else 60.0 * args.max_minutes,
                 init_weights=args.init_weights)
    print(f"mgr-engine train: {args.run_dir} at step {last.get('step', '?')}"
          + (f", loss {last['loss']:.4f}" if "loss" in last else ""))


def _add_info(sub):
    p = sub.add_parser("info", help="what this installation has: versions, devices, C++ kernels, weights found",
                       description="Print the versions of mgr_engine, Python, torch and the packages it uses where "
                                   "installed, the GPUs torch sees, whether the C++ kernels were built and which "
                                   "implementation the ops take on the CPU and on CUDA, and the checkpoint each model "
                                   "would load (or where it was looked for). Paste it into a bug report.")
    p.add_argument("--json", action="store_true", help="print it as a JSON object")
    p.set_defaults(run=run_info)


def run_info(args) -> None:
    import json

    from .info import collect, format_report

    report = collect()
    sys.stdout.write(json.dumps(report, indent=1) + "\n" if args.json else format_report(report))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mgr-engine", description="multiGradICON registration engine")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="only warnings, errors and the results (Dice, target registration errors, the Jacobian's "
                             "summary): no progress lines or bars")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_register(sub)
    _add_register_many(sub)
    _add_warp(sub)
    _add_jacobian(sub)
    _add_transform_points(sub)
    _add_dice(sub)
    _add_export(sub)
    _add_train(sub)
    _add_info(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results_log.setLevel(logging.INFO)
    try:
        args.run(args)
    except MgrEngineError as exc:
        print(f"mgr-engine {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mgr-engine {args.command}: interrupted; no output was written partially", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
