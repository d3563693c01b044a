"""Intensity normalization and resizing to the network's input, as the paper prescribes.

CT: clip to [-1000, 1000] HU (or a given window), scale to [0, 1].
MRI: clip to [image minimum, 99th percentile] (or a given quantile range), scale to [0, 1].
Both are then resized to the network's input shape with trilinear interpolation.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InvalidImageError, InvalidOptionError
from .itk_io import not_a_volume
from .labels import not_whole_numbers

MODALITIES = ("ct", "mri")
DEFAULT_CT_WINDOW = (-1000.0, 1000.0)
DEFAULT_MRI_UPPER_QUANTILE = 0.99


def quantile(values: torch.Tensor, q: float) -> float:
    """The k-th smallest value with ``k = int(q * n)`` clamped to [1, n] (no interpolation,
    as the reference computes it)."""
    flat = values.flatten()
    k = max(1, min(int(q * flat.numel()), flat.numel()))
    return float(torch.kthvalue(flat, k).values)


def check_volume(array: np.ndarray, name: str, stored_dtype=None) -> float:
    """Raise :class:`InvalidImageError` unless ``array`` is a finite, non-constant 3-D volume;
    return its lowest value. ``stored_dtype``: the image's own pixel type, where ``array`` is
    its float32 copy (a float64 value beyond float32's range became infinite there)."""
    if array.ndim != 3:
        raise not_a_volume(f"{name} image has {array.ndim} dimensions", array.ndim)
    if array.size == 0 or min(array.shape) < 2:
        raise InvalidImageError(f"{name} image has shape {array.shape}; each axis needs at least 2 voxels.")
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        overflow = (" in float32, which the network computes in (a float64 value beyond +-3.4e38 is infinite "
                    "there)" if np.dtype(array.dtype if stored_dtype is None else stored_dtype) == np.float64 else "")
        raise InvalidImageError(
            f"{name} image has {bad} NaN or infinite voxels{overflow}; replace them (for example with the "
            "background value) before registering."
        )
    low = float(array.min())
    if low == array.max():
        raise InvalidImageError(
            f"{name} image is constant ({low:g}); there is nothing to register. Check that the right file was "
            "passed."
        )
    return low


def check_mask(array: np.ndarray, name: str) -> None:
    """Raise :class:`InvalidImageError` unless ``array`` is a mask: whole numbers, none negative
    (0 outside, any positive label inside, so that input masking's "positive" and loss masking's
    "nonzero" agree), at least one voxel inside. A probability map's fractions would be kept
    wherever positive (the reference's command line casts them to integers first, dropping all
    but exact 1s), and an empty mask leaves nothing to register: both are a wrong file or a step
    missed, not a mask."""
    if array.size == 0:
        return  # check_same_grid has compared it with a checked image
    problem = not_whole_numbers(array)  # an integer mask (most are) has none
    if problem == "NaN or infinite":
        raise InvalidImageError(f"{name} has NaN or infinite voxels; give a binary mask (0 outside, 1 inside).")
    if problem == "fractional":
        raise InvalidImageError(
            f"{name} has fractional values (from {float(array.min()):g} to {float(array.max()):g}): a "
            "probability map? Threshold it into a binary mask (0 outside, 1 inside; for instance at 0.5) first.")
    low, high = array.min(), array.max()
    if low < 0:
        raise InvalidImageError(f"{name} has negative values (down to {low}); give a binary mask (0 outside, 1 inside).")
    if high <= 0:
        raise InvalidImageError(f"{name} is empty (no voxel above 0): nothing to register inside it. Check that the "
                                "right file was passed.")


HU_AIR = -500.0  # air (-1000 HU) and lung lie at or below it in a CT; an MR image has no such values
AIR_FRACTION = 0.01


def modality_mismatch(volume: np.ndarray, modality: str, ct_window=None, low: float | None = None) -> str | None:
    """Why ``volume`` looks like another modality than ``modality`` says (a sentence), or None.

    A CT in Hounsfield units has air, at most -500 HU, in at least 1 % of its voxels (the air
    around the body), which an MR image has not; an image said to be CT, without a ``ct_window``
    of its own, with no voxel below 0 is not in Hounsfield units (a CT stored without its rescale
    intercept reads 0 to 4095, air at 0) or is not a CT. Either way the normalization the network
    was trained with is not the one it gets. ``low``: the volume's lowest value, where known."""
    modality = check_modality(modality)
    low = float(volume.min()) if low is None else low
    if modality == "mri" and low <= HU_AIR:
        fraction = np.count_nonzero(volume <= HU_AIR) / volume.size
        if fraction >= AIR_FRACTION:
            return (f"{100 * fraction:.0f} % of its voxels lie at or below {HU_AIR:g}, as air does in a CT's "
                    "Hounsfield units, but its modality is 'mri', whose normalization clips to [min, 99th "
                    "percentile]; pass modality 'ct' for a CT (the [-1000, 1000] HU window the network was "
                    "trained with on CT)")
    if modality == "ct" and ct_window is None and low >= 0:
        return ("its modality is 'ct', but no voxel lies below 0, so it is not in Hounsfield units (air is -1000): "
                "a CT stored without its rescale intercept reads 0 to 4095, which the [-1000, 1000] HU window "
                "clips; apply the intercept (or pass a ct_window in its units), or pass modality 'mri' for an MR "
                "image")
    return None


def check_modality(modality: str, name: str = "input") -> str:
    """The modality in lower case; :class:`InvalidOptionError` unless it is 'ct' or 'mri'."""
    if str(modality).lower() not in MODALITIES:
        raise InvalidOptionError(f"unknown modality {modality!r} for the {name} image: use 'ct' or 'mri'")
    return str(modality).lower()


def check_intensity_ranges(ct_window=None, quantile_range=None) -> None:
    """Raise :class:`InvalidOptionError` unless ``ct_window`` (where given) is two finite numbers,
    min below max, and ``quantile_range`` two quantiles ``0 <= lower < upper <= 1``. The reference
    clamps a quantile above 1 to the image's maximum, so percentiles given for quantiles ((1, 99)
    for (0.01, 0.99)) failed only as "an empty intensity range" after the images were read."""
    for option, value in (("ct_window", ct_window), ("quantile_range", quantile_range)):
        if value is None:
            continue
        try:
            values = tuple(value)
        except TypeError:
            values = ()
        # numbers, not what float() takes: ("0", "1000") passed here and failed later as a TypeError
        if len(values) != 2 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
            raise InvalidOptionError(f"{option} takes two numbers (lower, upper), not {value!r}")
        low, high = (float(v) for v in values)
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            raise InvalidOptionError(f"{option} ({low:g}, {high:g}) needs a lower bound below its upper bound, both finite"
                                     + (" (HU; the default is -1000 1000)" if option == "ct_window" else ""))
        if option == "quantile_range" and not 0 <= low < high <= 1:
            raise InvalidOptionError(
                f"quantile_range ({low:g}, {high:g}) takes quantiles between 0 and 1, not percentiles: 0.01 0.99 "
                "clips at the 1st and 99th percentiles")


def normalize_intensity(volume: np.ndarray, modality: str, *, ct_window=None, quantile_range=None,
                        name: str = "input") -> torch.Tensor:
    """Clip and scale a volume to [0, 1] by modality; returns a float32 tensor of the same shape."""
    modality = check_modality(modality, name)
    values = torch.from_numpy(np.asarray(volume, dtype=np.float32))
    if modality == "ct":
        low, high = ct_window if ct_window is not None else DEFAULT_CT_WINDOW
    elif quantile_range is not None:
        low, high = quantile(values, quantile_range[0]), quantile(values, quantile_range[1])
    else:
        low, high = float(values.min()), quantile(values, DEFAULT_MRI_UPPER_QUANTILE)
    if not high > low:  # only an MRI's quantiles can meet: ct_window is checked before
        used = quantile_range if quantile_range is not None else (0, DEFAULT_MRI_UPPER_QUANTILE)
        raise InvalidImageError(
            f"{name} image: its {used[0]:g} and {used[1]:g} quantiles, which the MRI normalization clips to, are "
            f"both {low:g}: at least {100 * (used[1] - used[0]):g} % of its voxels hold that value (a small object "
            "in an empty volume, a label map?), which leaves no intensity range. Crop the image to its content, or "
            "widen quantile_range (0 1 takes the whole range).")
    # ITK's ShiftScale computes in double, then stores float: do the same. Clamping the float32
    # values to float32 bounds first is exact and leaves two float64 passes, in place.
    scaled = values.clamp(float(np.float32(low)), float(np.float32(high))).double()
    return scaled.sub_(low).mul_(1.0 / (high - low)).float()


def apply_input_mask(volume: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """Zero the voxels where ``mask`` is not positive."""
    return volume * torch.from_numpy(np.asarray(mask) > 0).to(volume.dtype)


def resize(volume: torch.Tensor, shape) -> torch.Tensor:
    """(D, H, W) or (B, C, D, H, W) volume resized trilinearly (``align_corners=False``)."""
    batched = volume if volume.dim() == 5 else volume[None, None]
    out = F.interpolate(batched, size=tuple(shape), mode="trilinear", align_corners=False)
    return out if volume.dim() == 5 else out[0, 0]


def resize_mask(mask: np.ndarray, shape) -> torch.Tensor:
    """A mask resized with nearest-neighbour interpolation, values kept (loss masking)."""
    tensor = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=tuple(shape), mode="nearest")

