"""Lazily read data: labels without decoding, batches that do not depend on workers, ranks or the global
RNG, the imagenet data set on a generated folder of mixed-size JPEGs, and bundles of your own Datasets."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from cpq_lib.config import TrainConfig
from cpq_lib.data import (DatasetPart, ImageTensors, TensorBatchLoader, Augment, bundle_from_datasets, dataset_labels,
                          load_dataset, ready_batches)
from cpq_lib.data.imagenet import IMAGENET_MEAN
from cpq_lib.data.synthetic import write_image_folder
from cpq_lib.errors import DataError
from cpq_lib.models import build_model
from cpq_lib.train import evaluate, train_model


class Noisy(Dataset):
    """Items drawn with torch's global RNG (as torchvision's random transforms are); counts its reads."""

    def __init__(self, n: int = 30, classes: int = 3) -> None:
        self.n, self.classes, self.reads = n, classes, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        self.reads += 1
        return torch.full((3, 4, 4), index / self.n) + 0.01 * torch.rand(3, 4, 4), index % self.classes


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imagenet-like") / "root", classes=10, per_class=24, test_per_class=6)


def _epoch(loader, epoch=0):
    loader.set_epoch(epoch)
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]), [len(y) for _, y in batches]


def test_labels_come_from_the_data_set_without_decoding():
    dataset = Noisy()
    dataset.targets = [i % 3 for i in range(30)]
    assert dataset_labels(dataset).tolist() == dataset.targets and dataset.reads == 0
    del dataset.targets
    dataset.samples = [(f"{i}.jpg", i % 3) for i in range(30)]
    assert dataset_labels(dataset).tolist() == [i % 3 for i in range(30)] and dataset.reads == 0
    del dataset.samples
    assert dataset_labels(dataset).tolist() == [i % 3 for i in range(30)] and dataset.reads == 30  # read once


def test_batches_do_not_depend_on_workers_ranks_or_the_global_rng():
    part = DatasetPart(Noisy(), augmented=Noisy())
    reference = _epoch(part.loader(8, shuffle=True, augment=True, seed=5))
    torch.rand(100)  # whatever else drew from the global generator in between
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
               for a, b in zip(reference, _epoch(part.loader(8, shuffle=True, augment=True, seed=5))))
    workers = DatasetPart(Noisy(), augmented=Noisy(), workers=2)
    images, labels, sizes = _epoch(workers.loader(8, shuffle=True, augment=True, seed=5))
    assert torch.equal(images, reference[0]) and torch.equal(labels, reference[1]) and sizes == [8, 8, 8, 6]
    pieces = [_epoch(part.loader(8, shuffle=True, augment=True, seed=5, shard=(rank, 3))) for rank in range(3)]
    assert [p[2] for p in pieces] == [[3, 3, 3, 2], [3, 3, 3, 2], [2, 2, 2, 2]]
    merged = torch.cat([torch.cat([p[0][sum(p[2][:i]):sum(p[2][:i + 1])] for p in pieces]) for i in range(4)])
    assert torch.equal(merged, reference[0])  # the ranks' pieces of every global batch make up the single process's
    other_epoch = _epoch(part.loader(8, shuffle=True, augment=True, seed=5), epoch=1)[0]
    assert not torch.equal(other_epoch, reference[0])
    plain = _epoch(part.loader(8))
    assert plain[1].tolist() == [i % 3 for i in range(30)]  # no shuffle: the items in order
    assert part.subset(np.array([4, 2])).labels.tolist() == [1, 2]


def test_in_memory_batches_split_between_ranks_as_the_single_process_draws_them():
    data = ImageTensors(torch.randint(0, 255, (23, 3, 6, 6), dtype=torch.uint8), torch.arange(23) % 4)
    for resident in (False, True):
        whole = list(TensorBatchLoader(data, 8, shuffle=True, augment=Augment(pad=2), seed=1, resident=resident))
        pieces = [list(TensorBatchLoader(data, 8, shuffle=True, augment=Augment(pad=2), seed=1, resident=resident,
                                         shard=(rank, 2))) for rank in range(2)]
        for index, (images, labels) in enumerate(whole):
            assert torch.equal(torch.cat([pieces[0][index][0], pieces[1][index][0]]), images)
            assert torch.equal(torch.cat([pieces[0][index][1], pieces[1][index][1]]), labels)
    with pytest.raises(ValueError, match="shard must be"):
        TensorBatchLoader(data, 2, shard=(0, 3))


def test_imagenet_folder_of_mixed_sizes_is_read_lazily(folder, tmp_cache):
    bundle = load_dataset("imagenet", folder, image_size=32, val_fraction=0.2, split_seed=1)
    assert bundle.streaming and bundle.sizes() == {"train": 192, "val": 48, "test": 60}
    assert bundle.classes == [f"class{i:03d}" for i in range(10)] and bundle.image_size == (32, 32) and bundle.in_channels == 3
    assert set(np.bincount(bundle.val.labels.numpy(), minlength=10).tolist()) <= {4, 5}  # stratified: 4.8 of each class's 24
    assert bundle.channel_stats()[0] == list(IMAGENET_MEAN)  # the normalisation torchvision's weights expect
    images, labels = next(iter(bundle.train_loader(16, seed=0)))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.get_default_dtype()
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    evaluation = torch.cat([x for x, _ in bundle.eval_loader("val", 20)])
    kept = ready_batches(bundle.val, 20)  # ToTensor's k/255 pixels: kept as uint8, the same floats on every pass
    assert kept.kept[0][0].dtype == torch.uint8 and torch.equal(torch.cat([x for x, _ in kept]), evaluation)
    assert torch.equal(evaluation, torch.cat([x for x, _ in bundle.eval_loader("val", 7)]))  # centre crops: no randomness
    assert len(bundle.per_class_loader(3).part) == 30 and len(bundle.calibration_loader(40).part) == 40
    search = bundle.for_search()
    with pytest.raises(DataError, match="test split is read once"):
        search.eval_loader("test")
    again = load_dataset("imagenet", folder, image_size=32, val_fraction=0.2, split_seed=1)
    assert again.val_digest == bundle.val_digest
    assert load_dataset("imagenet", folder, image_size=32, val_fraction=0.2, split_seed=2).val_digest != bundle.val_digest
    archive = folder.parent / "root.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.rglob("*.jpg")):
            handle.write(path, path.relative_to(folder.parent))  # one wrapper folder, as zips usually have
    zipped = load_dataset("imagenet", archive, image_size=32, val_fraction=0.2, split_seed=1)
    assert zipped.val_digest == bundle.val_digest and "sha256" in zipped.source
    assert torch.equal(torch.cat([x for x, _ in zipped.eval_loader("test", 30)]),
                       torch.cat([x for x, _ in bundle.eval_loader("test", 30)]))


def test_imagenet_errors_name_the_problem(folder, tmp_path):
    with pytest.raises(DataError, match="needs a root"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("imagenet", tmp_path / "missing")
    only_train = tmp_path / "only-train"
    shutil.copytree(folder / "train", only_train / "train")
    with pytest.raises(DataError, match=r"expected train/<class>/\* and val/<class>/\*"):
        load_dataset("imagenet", only_train)
    with pytest.raises(DataError, match="image_size must be an integer >= 8"):
        load_dataset("imagenet", folder, image_size=4)


def test_a_small_network_learns_the_generated_classes_from_the_lazy_loader(folder):
    torch.manual_seed(0)
    bundle = load_dataset("imagenet", folder, image_size=32, val_fraction=0.2)
    model = build_model("digits_cnn", 10, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3)
    history = train_model(model, bundle, TrainConfig(epochs=3, batch_size=32, lr=0.05, compile="off"), seed=0,
                          progress=False).history
    assert history[-1]["val_accuracy"] >= 0.8  # chance is 0.1: labels and pixels travel together
    assert evaluate(model, bundle.eval_loader("test"), 10).accuracy >= 0.8


def test_your_own_datasets_make_a_bundle(tmp_path):
    train, test = Noisy(60), Noisy(12)
    bundle = bundle_from_datasets("mine", ["a", "b", "c"], train, test, val_fraction=0.25, mean=[0.5] * 3, std=[0.2] * 3)
    assert bundle.sizes() == {"train": 45, "val": 15, "test": 12} and bundle.channel_stats() == ([0.5] * 3, [0.2] * 3)
    assert bundle.image_size == (4, 4)
    given = bundle_from_datasets("mine", ["a", "b", "c"], train, test, val=Noisy(9))
    assert given.sizes() == {"train": 60, "val": 9, "test": 12}
    estimated = bundle_from_datasets("mine", ["a", "b", "c"], train, test).channel_stats()
    assert 0.3 < estimated[0][0] < 0.7  # estimated on training images
    streamed = ready_batches(bundle.val, 4, cache_bytes=0)  # too large to keep: decoded again on every pass
    reads = train.reads
    first, second = [torch.cat([y for _, y in streamed]) for _ in range(2)]
    assert torch.equal(first, second) and len(first) == 15 and train.reads == reads + 30
    kept = ready_batches(bundle.val, 4)  # small: read once, kept (as floats: these are not k/255 pixels)
    reads = train.reads
    passes = [torch.cat([x for x, _ in kept]) for _ in range(2)]
    assert torch.equal(passes[0], passes[1]) and passes[0].dtype == torch.get_default_dtype() and train.reads == reads
    assert torch.equal(torch.cat([y for _, y in kept]), first)
    with pytest.raises(DataError, match=r"labels must lie in 0..1"):
        bundle_from_datasets("mine", ["a", "b"], train, test)
    with pytest.raises(DataError, match="both mean and std"):
        bundle_from_datasets("mine", ["a", "b", "c"], train, test, mean=[0.5] * 3)
