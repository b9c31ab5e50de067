import pytest
import torch

from cpq_lib.data import load_dataset, sources
from cpq_lib.data.sources import read_image_folder
from cpq_lib.errors import DataError

from helpers import make_image_folder, zip_folder


def test_image_folder_tree_and_zip_give_the_same_tensors(tmp_path, tmp_cache):
    tree = make_image_folder(tmp_path / "tree", wrapper="wrapped")
    from_tree = read_image_folder(tree)
    from_zip = read_image_folder(zip_folder(tree, tmp_path / "tree.zip"))
    assert from_tree.classes == from_zip.classes == ["cat", "dog", "eel"]
    assert from_tree.train.images.shape == (18, 3, 8, 8) and len(from_tree.test) == 6
    assert torch.equal(from_tree.train.images, from_zip.train.images)
    assert torch.equal(from_tree.train.labels, torch.tensor([0] * 6 + [1] * 6 + [2] * 6))
    assert len(from_zip.source["sha256"]) == 64


def test_decoded_images_are_cached(tmp_path, tmp_cache, monkeypatch):
    archive = zip_folder(make_image_folder(tmp_path / "tree"), tmp_path / "tree.zip")
    first = read_image_folder(archive)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(sources, "_decode", no_decoding)
    second = read_image_folder(archive)
    assert torch.equal(first.test.images, second.test.images) and second.classes == first.classes


def test_train_and_test_classes_must_agree(tmp_path, tmp_cache):
    tree = make_image_folder(tmp_path / "tree")
    (tree / "test" / "eel").rename(tree / "test" / "emu")
    with pytest.raises(DataError, match="class folders differ"):
        read_image_folder(tree)


def test_mixed_image_sizes_are_an_error(tmp_path, tmp_cache):
    tree = make_image_folder(tmp_path / "tree")
    make_image_folder(tmp_path / "other", size=(9, 9))
    (tmp_path / "other" / "train" / "cat" / "0000.png").rename(tree / "train" / "cat" / "big.png")
    with pytest.raises(DataError, match="different sizes"):
        read_image_folder(tree)


def test_not_an_image_folder(tmp_path, tmp_cache):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not an image-folder root"):
        read_image_folder(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a .zip"):
        read_image_folder(tmp_path / "notes.txt")


def test_cifar10_root_with_other_classes_is_rejected(tmp_path, tmp_cache):
    tree = make_image_folder(tmp_path / "tree")
    with pytest.raises(DataError, match="must have 10 classes"):
        load_dataset("cifar10", tree)


def test_missing_roots_are_clear_errors(tmp_path, tmp_cache):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", tmp_path / "nowhere")
    with pytest.raises(DataError, match="no data root given for cifar100"):
        load_dataset("cifar100")
    with pytest.raises(DataError, match="needs a root"):
        load_dataset("imagefolder")


def test_unknown_data_set():
    with pytest.raises(DataError, match="unknown data set 'mnist'.*digits"):
        load_dataset("mnist")


@pytest.mark.shared_data
def test_shared_cifar10_zip_reads_as_cifar10(cifar10):
    assert cifar10.sizes() == {"train": 45_000, "val": 5_000, "test": 10_000}
    assert cifar10.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert cifar10.train.images.shape[1:] == (3, 32, 32) and cifar10.train.images.dtype == torch.uint8
    assert torch.bincount(cifar10.val.labels).tolist() == [500] * 10
    assert torch.bincount(cifar10.test.labels).tolist() == [1_000] * 10
    # the copy re-packed losslessly on 2026-11-22 (same pixels as the b6b511e9... copy the shipped model was trained on)
    assert cifar10.source["sha256"] == "072b2118c23126a34c4ae106912609814d3a75f9867c0096c2f5458517c0f29c"


def test_cifar100_on_a_cifar10_torchvision_root_names_both(tmp_path, tmp_cache):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataError, match="holds cifar-10-batches-py \\(cifar10\\), not cifar100's cifar-100-python"):
        load_dataset("cifar100", tmp_path)
