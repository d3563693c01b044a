"""Label maps (mgr_engine.labels): Dice per label against a label-by-label count."""

import numpy as np
import pytest

from mgr_engine import labels as labels_module
from mgr_engine.errors import InvalidImageError
from mgr_engine.labels import dice_per_label, label_array


def dice_by_label(labels, reference):
    """The definition, one label at a time."""
    out = {}
    for label in np.unique(reference):
        if label != 0:
            a, b = labels == label, reference == label
            out[int(label)] = 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
    return out


@pytest.mark.parametrize("slab", [None, 97])  # the whole map at once; slabs that do not divide it
@pytest.mark.parametrize("scale", [1, -3, 10**7])  # bins by offset; negative labels; sparse IDs (ranks as bins)
def test_dice_per_label_is_the_definitions_count(scale, slab, monkeypatch):
    if slab:
        monkeypatch.setattr(labels_module, "_SLAB_VOXELS", slab)
    rng = np.random.default_rng(1)
    reference = rng.integers(0, 12, (9, 14, 11)) * scale
    labels = np.where(rng.random(reference.shape) < 0.7, reference, rng.integers(0, 15, reference.shape) * scale)
    labels[labels == 5 * scale] = 0  # a label of the reference missing from the other map: Dice 0
    dice = dice_per_label(labels, reference)
    expected = dice_by_label(labels, reference)
    assert list(dice) == sorted(expected) and len(dice) == 11  # 0 and labels only `labels` holds not counted
    np.testing.assert_allclose([dice[k] for k in expected], [expected[k] for k in expected], rtol=0, atol=1e-15)
    assert dice[5 * scale] == 0.0 and 0.5 < dice[1 * scale] < 1.0
    assert dice_per_label(reference, reference) == {k: 1.0 for k in expected}


def test_maps_of_different_sizes_and_label_maps_that_are_not_whole_numbers_are_typed_errors():
    itk = pytest.importorskip("itk")
    with pytest.raises(InvalidImageError, match="one grid"):
        dice_per_label(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))
    whole = itk.image_from_array(np.array([[[0.0, 2.0], [3.0, 1.0]]], dtype=np.float32))
    assert label_array(whole).dtype == np.int64 and label_array(whole).tolist() == [[[0, 2], [3, 1]]]
    assert label_array(itk.image_from_array(np.array([[[0, 2]]], dtype=np.uint8))).dtype == np.uint8  # kept
    with pytest.raises(InvalidImageError, match="not whole numbers"):
        label_array(itk.image_from_array(np.array([[[0.0, 2.5]]], dtype=np.float32)), "labels")
