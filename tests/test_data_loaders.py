import pytest
import torch

from cpq_lib.data import Augment, TensorBatchLoader, random_crop_flip
from cpq_lib.data.sources import ImageTensors


def _tensors(n=10):
    images = torch.arange(n * 3 * 4 * 4, dtype=torch.int64).remainder(251).to(torch.uint8).view(n, 3, 4, 4)
    return ImageTensors(images, torch.arange(n) % 3)


def _indexed(n=23):
    """Image i is filled with the value i and labelled i: batches reveal which images they hold."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return ImageTensors(images, torch.arange(n))


def test_batches_cover_every_image_once_in_range():
    loader = TensorBatchLoader(_tensors(), batch_size=4, shuffle=True, seed=1)
    seen = torch.cat([labels for _, labels in loader])
    images = torch.cat([x for x, _ in loader])
    assert len(loader) == 3 and seen.shape == (10,) and images.shape == (10, 3, 4, 4)
    assert images.dtype == torch.float32 and 0.0 <= images.min() and images.max() <= 1.0


@pytest.mark.parametrize("shuffle,augment", [(False, None), (True, None), (True, Augment(pad=1, flip=True))])
def test_every_image_exactly_once_per_epoch_with_its_own_label(shuffle, augment):
    data = _indexed()
    loader = TensorBatchLoader(data, batch_size=5, shuffle=shuffle, augment=augment, seed=3)
    orders = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        labels, images = zip(*[(y, x) for x, y in loader])
        labels, images = torch.cat(labels), torch.cat(images)
        assert sorted(labels.tolist()) == list(range(len(data)))  # each exactly once, none dropped
        # the image travels with its label: its largest pixel is its index (padding only adds zeros)
        assert torch.equal((images.flatten(1).amax(1) * 255).round().long(), labels)
        orders.append(labels.tolist())
    assert (orders[0] != orders[1]) == shuffle  # shuffled epochs differ, unshuffled ones do not


def test_drop_last_drops_only_the_short_batch():
    loader = TensorBatchLoader(_indexed(23), batch_size=5, shuffle=True, seed=0, drop_last=True)
    labels = torch.cat([y for _, y in loader])
    assert len(loader) == 4 and labels.numel() == 20 and labels.unique().numel() == 20


def test_order_depends_only_on_seed_and_epoch():
    def order(seed, epoch):
        loader = TensorBatchLoader(_tensors(), batch_size=10, shuffle=True, augment=Augment(1, True), seed=seed)
        loader.set_epoch(epoch)
        return next(iter(loader))[0]

    assert torch.equal(order(0, 3), order(0, 3))
    assert not torch.equal(order(0, 3), order(0, 4))
    assert not torch.equal(order(1, 3), order(0, 3))


def test_crop_without_padding_and_flip_is_identity():
    images = _tensors().images
    assert torch.equal(random_crop_flip(images, Augment(0, False), torch.Generator().manual_seed(0)), images)


def test_crop_is_a_shifted_window_of_the_padded_image():
    images = _tensors(64).images
    out = random_crop_flip(images, Augment(pad=1, flip=False), torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    windows = {(dy, dx): padded[:, :, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)}
    for index in range(64):
        matches = [k for k, w in windows.items() if torch.equal(w[index], out[index])]
        assert matches, f"image {index} is not a crop of its padded original"
    assert len({next(k for k, w in windows.items() if torch.equal(w[i], out[i])) for i in range(64)}) > 1


def test_flip_mirrors_some_images_exactly():
    images = _tensors(64).images
    out = random_crop_flip(images, Augment(pad=0, flip=True), torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], images[i].flip(2)) for i in range(64)]
    kept = [torch.equal(out[i], images[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_per_class_and_calibration_loaders(digits):
    loader = digits.per_class_loader(5, split="val", seed=0)
    labels = torch.cat([y for _, y in loader])
    assert torch.bincount(labels).tolist() == [5] * 10
    calibration = torch.cat([x for x, _ in digits.calibration_loader(100, seed=0)])
    train = digits.train.images.float().div(255).flatten(1)
    # every calibration image is a training image (never validation or test)
    assert all((train == image.flatten()).all(dim=1).any() for image in calibration[:20])


def _random_images(n=37, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return ImageTensors(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=generator), torch.arange(n) % 5)


def _epochs(loader, epochs=3):
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out.append([(x.cpu(), y.cpu()) for x, y in loader])
    return out


@pytest.mark.parametrize("augment", [None, Augment(pad=2, flip=True), Augment(pad=0, flip=True), Augment(pad=3, flip=False)])
@pytest.mark.parametrize("batch_size,drop_last", [(8, False), (8, True), (37, False), (50, False)])
def test_device_resident_path_makes_the_same_batches_as_the_cpu_path(augment, batch_size, drop_last):
    """The GPU path (images kept on the device, an epoch's draws made up front) run on CPU tensors:
    the same images, crops, flips and labels as the CPU path, batch for batch, for several epochs."""
    data = _random_images()
    kwargs = dict(batch_size=batch_size, shuffle=True, augment=augment, seed=5, drop_last=drop_last)
    plain = _epochs(TensorBatchLoader(data, **kwargs))
    resident = _epochs(TensorBatchLoader(data, resident=True, **kwargs))
    assert len(plain[0]) == len(TensorBatchLoader(data, **kwargs)) and len(plain[0]) > 0
    for epoch_plain, epoch_resident in zip(plain, resident):
        assert len(epoch_plain) == len(epoch_resident)
        for (x1, y1), (x2, y2) in zip(epoch_plain, epoch_resident):
            assert x1.dtype == x2.dtype == torch.float32 and torch.equal(x1, x2) and torch.equal(y1, y2)
    if augment is not None and (augment.pad or augment.flip):
        assert not torch.equal(plain[0][0][0], plain[1][0][0])  # the augmentation really varies


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_resident_batches_equal_the_cpu_path_and_stay_on_the_device():
    data = _random_images(200)
    kwargs = dict(batch_size=64, shuffle=True, augment=Augment(pad=4, flip=True), seed=1)
    cuda_loader = TensorBatchLoader(data, device="cuda", **kwargs)
    assert cuda_loader.resident
    x, y = next(iter(cuda_loader))
    assert x.is_cuda and y.is_cuda
    for (x1, y1), (x2, y2) in zip(_epochs(TensorBatchLoader(data, **kwargs))[1], _epochs(cuda_loader)[1]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert data.on("cuda") is data.on("cuda")  # copied to the device once
