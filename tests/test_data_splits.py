import numpy as np
import pytest

from cpq_lib.data import load_dataset
from cpq_lib.data.splits import stratified_sample, stratified_split
from cpq_lib.errors import DataError


def test_digits_split_sizes_and_classes(digits):
    assert digits.sizes() == {"train": 1293, "val": 144, "test": 360}
    assert digits.classes == [str(i) for i in range(10)] and digits.num_classes == 10
    assert digits.in_channels == 1 and digits.image_size == (8, 8)


def test_split_is_deterministic_and_seed_dependent(digits):
    again = load_dataset("digits")
    assert again.val_digest == digits.val_digest
    assert (again.val.images == digits.val.images).all()
    other = load_dataset("digits", split_seed=1)
    assert other.val_digest != digits.val_digest
    assert len(other.val) == len(digits.val)
    assert len(other.test) == len(digits.test) and (other.test.images == digits.test.images).all()


def test_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    kept, held = stratified_split(labels, 0.1, seed=3)
    assert np.bincount(labels[held]).tolist() == [10, 5, 3, 2]
    assert not set(kept) & set(held) and len(kept) + len(held) == len(labels)


def test_bad_fraction():
    with pytest.raises(DataError, match="must be in \\(0, 1\\), got 1.5"):
        stratified_split(np.zeros(10), 1.5, 0)


def test_sampling_per_class_and_empty_class():
    labels = np.repeat(np.arange(3), [10, 4, 7])
    chosen = stratified_sample(labels, per_class=5, total=None, seed=0, num_classes=3)
    assert np.bincount(labels[chosen]).tolist() == [5, 4, 5]
    with pytest.raises(DataError, match="class 3 has no images"):
        stratified_sample(labels, per_class=5, total=None, seed=0, num_classes=4)


@pytest.mark.parametrize("kwargs,message", [
    ({"per_class": -1, "total": None}, "per_class must be a positive integer.*-1"),
    ({"per_class": 0, "total": None}, "per_class must be a positive integer.*0"),
    ({"per_class": None, "total": -5}, "total must be a positive integer.*-5"),
    ({"per_class": True, "total": None}, "per_class must be a positive integer.*True"),
])
def test_sample_sizes_must_be_positive(kwargs, message):
    with pytest.raises(DataError, match=message):
        stratified_sample(np.repeat(np.arange(3), 5), seed=0, num_classes=3, **kwargs)


def test_loaders_refuse_non_positive_sizes(digits):
    with pytest.raises(DataError, match="per_class.*-1"):
        digits.per_class_loader(-1)
    with pytest.raises(DataError, match="total.*-5"):
        digits.calibration_loader(-5)


def test_too_few_images_for_a_stratified_split_is_a_clear_error():
    labels = np.repeat(np.arange(5), 3)  # 15 images, 5 classes: 10% held out is 2 images for 5 classes
    with pytest.raises(DataError, match="15 images into 13 \\+ 2.*5 classes"):
        stratified_split(labels, 0.1, 0)
    with pytest.raises(DataError, match="class 4.*1 image"):
        stratified_split(np.array([0, 0, 1, 1, 2, 2, 3, 3, 4]), 0.5, 0)


@pytest.mark.parametrize("kwargs,message", [({"split_seed": -1}, "split_seed.*-1"), ({"split_seed": 1.5}, "split_seed.*1.5"),
                                            ({"val_fraction": 0.0}, "val_fraction.*0.0"), ({"val_fraction": 1}, "val_fraction.*1")])
def test_load_dataset_checks_split_settings(kwargs, message):
    with pytest.raises(DataError, match=message):
        load_dataset("digits", **kwargs)
