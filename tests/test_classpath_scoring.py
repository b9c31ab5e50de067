"""The batched scorer against a plain per-image loop written here with its own autograd code."""

import pytest
import torch
from torch import nn

from cpq_lib.classpath import ClassScores, ScoreSettings, ScoringError, cached_scores, score_classes
from cpq_lib.data import TensorBatchLoader
from cpq_lib.data.sources import ImageTensors
from cpq_lib.models import build_model


def oracle_scores(model, images, labels, names, num_classes, target="logit", eps=0.0, aggregate="position"):
    """The reference procedure in a plain loop: one image per forward/backward, retain_grad on each
    scored output. Every image counts (the reference code skips each class's first image; we do not).

    position: per class and position, the fraction of images with t > eps; then the max over positions.
    image: per image, whether t > eps anywhere; then the fraction of images.
    """
    modules = dict(model.named_modules())
    model.eval()
    hits = {}
    for x, y in zip(images, labels):
        outputs = {}

        def keep(module, inputs, output, name):
            output.retain_grad()
            outputs[name] = output

        handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: keep(m, i, o, n)) for n in names]
        logits = model(x[None])
        for handle in handles:
            handle.remove()
        value = logits[0, y] if target == "logit" else nn.functional.cross_entropy(logits, y[None])
        model.zero_grad()
        value.backward()
        for name in names:
            a, g = outputs[name], outputs[name].grad
            t = (a * g).abs().detach()[0]                # (C,) or (C, H, W)
            active = (t > eps).float().reshape(t.shape[0], -1)  # (C, positions)
            if aggregate == "image":
                active = active.amax(1, keepdim=True)    # active anywhere in this image
            hits.setdefault(name, torch.zeros(num_classes, *active.shape))
            hits[name][y] += active
    counts = torch.bincount(labels, minlength=num_classes).float()
    return {n: (h / counts[:, None, None]).amax(2) for n, h in hits.items()}


@pytest.fixture(scope="module")
def trained_digits(digits_baseline):
    return digits_baseline[0]


def _subset(data, per_class, split="train"):
    loader = data.per_class_loader(per_class, split=split, seed=0, batch_size=37)  # batches mix classes
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels), loader


@pytest.mark.parametrize("aggregate", ["position", "image"])
@pytest.mark.parametrize("target", ["logit", "loss"])
def test_batched_equals_per_image_loop_on_trained_digits(trained_digits, digits, target, aggregate):
    images, labels, loader = _subset(digits, 8)
    settings = ScoreSettings(target=target, aggregate=aggregate)
    scores = score_classes(trained_digits, loader, 10, digits.classes, settings, progress=False)
    reference = oracle_scores(trained_digits, images, labels, scores.layers, 10, target, aggregate=aggregate)
    assert scores.layers == ["stem.0", "features.0.0", "features.2.0", "classifier"]
    for name in scores.layers:
        assert torch.equal(scores.scores[name], reference[name]), name
    everything = torch.cat([s.flatten() for s in scores.scores.values()])
    assert not bool((everything == 0).all()) and not bool((everything == 1).all())
    assert ((everything > 0) & (everything < 1)).any(), "scores should not be trivially 0 or 1"


def test_default_is_the_reference_order():
    assert ScoreSettings().aggregate == "position"
    with pytest.raises(ScoringError, match="unknown aggregate 'pixel'.*position, image"):
        ScoreSettings(aggregate="pixel")


def _shipped_or_warmed_resnet20(cifar10):
    from cpq_lib.models import available_pretrained, load_pretrained

    if ("resnet20", "cifar10") in available_pretrained():
        return load_pretrained("resnet20", "cifar10")[0]
    torch.manual_seed(0)  # before the shipped checkpoint exists: a seeded model with real batch-norm statistics
    model = build_model("resnet20", 10)
    model.train()
    with torch.no_grad():
        model(cifar10.train.images[:512].float() / 255)
    return model


@pytest.mark.parametrize("aggregate", ["position", "image"])
def test_batched_equals_per_image_loop_on_resnet20(cifar10, aggregate):
    model = _shipped_or_warmed_resnet20(cifar10)
    images, labels, loader = _subset(cifar10, 3)
    scores = score_classes(model, loader, 10, cifar10.classes, ScoreSettings(aggregate=aggregate), progress=False)
    reference = oracle_scores(model, images, labels, scores.layers, 10, aggregate=aggregate)
    assert len(scores.layers) == 22
    for name in scores.layers:
        assert torch.equal(scores.scores[name], reference[name]), name
    everything = torch.cat([s.flatten() for s in scores.scores.values()])
    assert ((everything > 0) & (everything < 1)).any() and (everything == 1).any()


def test_reference_order_scores_are_informative_on_the_shipped_resnet20(cifar10):
    """On the trained network with 20 images per class, the reference order spreads scores inside layers
    and tells classes apart, where the image order marks almost every channel important to every class."""
    model = _shipped_or_warmed_resnet20(cifar10)
    loader = cifar10.per_class_loader(20, split="train", seed=0)
    position = score_classes(model, loader, 10, cifar10.classes, progress=False)
    image = score_classes(model, loader, 10, cifar10.classes, ScoreSettings(aggregate="image"), progress=False)
    inner = [n for n in position.layers if n.startswith("layer")]
    saturated = {name: float((s.scores[name] >= 0.95).all(0).double().mean()) for s, name in
                 [(position, n) for n in inner]}
    saturated_image = {name: float((image.scores[name] >= 0.95).all(0).double().mean()) for name in inner}
    # image order: in most inner layers nearly every channel scores >= 0.95 for every class
    assert sum(v > 0.8 for v in saturated_image.values()) >= len(inner) // 2
    # position order: a real spread within layers (interquartile range), far fewer saturated channels
    for name in ("layer2.1.conv1", "layer3.1.conv1"):
        q1, q3 = torch.quantile(position.scores[name].flatten().double(), torch.tensor([0.25, 0.75], dtype=torch.float64))
        assert float(q3 - q1) > 0.1, (name, float(q1), float(q3))
    assert sum(saturated.values()) < 0.5 * sum(saturated_image.values())
    # classes differ: per layer, some channel's scores differ across classes by a wide margin, and no
    # two classes have identical score vectors
    flat = torch.cat([position.scores[n] for n in inner], dim=1)
    spread = [float((position.scores[n].amax(0) - position.scores[n].amin(0)).max()) > 0.3 for n in inner]
    assert sum(spread) >= 0.75 * len(inner), spread
    distances = torch.cdist(flat.double(), flat.double())
    assert float(distances[~torch.eye(10, dtype=torch.bool)].min()) > 0.5


def test_digits_classes_have_different_scores(trained_digits, digits):
    """Informativeness on the quick tier: every pair of classes differs, and each class has its own
    top channels (a scorer returning the same vector for every class would fail)."""
    loader = digits.per_class_loader(20, split="train", seed=0)
    scores = score_classes(trained_digits, loader, 10, digits.classes, progress=False)
    flat = torch.cat([scores.scores[n] for n in scores.layers if n != "classifier"], dim=1).double()
    distances = torch.cdist(flat, flat)
    assert float(distances[~torch.eye(10, dtype=torch.bool)].min()) > 0.1
    top = {tuple(torch.topk(row, 10).indices.sort().values.tolist()) for row in flat}
    assert len(top) >= 5, "classes should not share one set of most important channels"


def test_dead_channel_scores_zero(trained_digits, digits):
    model = build_model("digits_cnn", 10, in_channels=1)
    model.load_state_dict(trained_digits.state_dict())
    with torch.no_grad():
        model.features[0][0].weight[5] = 0  # channel 5 of this conv outputs zeros for every input
    _, _, loader = _subset(digits, 5)
    scores = score_classes(model, loader, 10, digits.classes, progress=False)
    assert torch.equal(scores.scores["features.0.0"][:, 5], torch.zeros(10))
    assert scores.scores["features.0.0"][:, :5].sum() > 0


def test_other_scorers_and_named_modules(trained_digits, digits):
    _, _, loader = _subset(digits, 4)
    activation = score_classes(trained_digits, loader, 10, digits.classes, ScoreSettings(scorer="activation"), progress=False)
    gradient = score_classes(trained_digits, loader, 10, digits.classes,
                             ScoreSettings(scorer="gradient", modules=("features.0.2",)), progress=False)
    assert activation.scores["stem.0"].shape == (10, 16) and (activation.scores["stem.0"] > 0).all()
    assert gradient.layers == ["features.0.2"] and (gradient.scores["features.0.2"] >= 0).all()
    counts = activation.class_count()
    assert torch.allclose(counts["stem.0"], activation.scores["stem.0"].sum(0))


class ConvReLUInPlace(nn.Module):
    """conv -> in-place ReLU: the scored conv output is overwritten by the ReLU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        return self.head(self.relu(self.conv(x)).mean((2, 3)))


def test_in_place_modification_of_a_scored_output_is_handled(digits):
    torch.manual_seed(0)
    model = ConvReLUInPlace()
    images, labels, loader = _subset(digits, 3)
    scores = score_classes(model, loader, 10, digits.classes, progress=False)
    model.relu.inplace = False  # the oracle needs the pre-ReLU output intact
    reference = oracle_scores(model, images, labels, scores.layers, 10)
    model.relu.inplace = True
    for name in scores.layers:
        assert torch.equal(scores.scores[name], reference[name]), name
    assert model.relu.inplace is True


def test_model_is_left_as_it_was(trained_digits, digits):
    trained_digits.train()
    flags = [p.requires_grad for p in trained_digits.parameters()]
    _, _, loader = _subset(digits, 2)
    score_classes(trained_digits, loader, 10, digits.classes, progress=False)
    assert trained_digits.training and [p.requires_grad for p in trained_digits.parameters()] == flags
    assert trained_digits.features[0][2].inplace is True
    trained_digits.eval()


def test_errors(trained_digits, digits):
    only_some = ImageTensors(digits.train.images[:20], torch.tensor([0, 1] * 10))
    with pytest.raises(ScoringError, match=r"class\(es\) \['2', '3'"):
        score_classes(trained_digits, TensorBatchLoader(only_some, 8), 10, digits.classes, progress=False)
    with pytest.raises(ScoringError, match="class count mismatch"):
        score_classes(trained_digits, TensorBatchLoader(only_some, 8), 2, progress=False)
    with pytest.raises(ScoringError, match="unknown module"):
        score_classes(trained_digits, TensorBatchLoader(only_some, 8), 10, settings=ScoreSettings(modules=("nope",)), progress=False)
    with pytest.raises(ScoringError, match="unknown scorer 'shap'"):
        ScoreSettings(scorer="shap")
    with pytest.raises(ScoringError, match="eps must be >= 0"):
        ScoreSettings(eps=-1)


def test_save_load_and_cache(trained_digits, digits, tmp_path):
    _, _, loader = _subset(digits, 2)
    calls = []

    def compute():
        calls.append(1)
        return score_classes(trained_digits, loader, 10, digits.classes, progress=False, full_precision=["stem.0"])

    first = cached_scores(tmp_path, trained_digits, {"split": "train", "per_class": 2}, compute, ScoreSettings())
    second = cached_scores(tmp_path, trained_digits, {"split": "train", "per_class": 2}, compute, ScoreSettings())
    assert len(calls) == 1 and second.full_precision == ["stem.0"]
    assert all(torch.equal(first.scores[n], second.scores[n]) for n in first.layers)
    cached_scores(tmp_path, trained_digits, {"split": "train", "per_class": 3}, compute, ScoreSettings())
    assert len(calls) == 2  # another data key: computed again
    frame = second.to_frame()
    assert len(frame) == sum(s.numel() for s in second.scores.values()) and set(frame["class"]) == set(digits.classes)
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(ScoringError, match="unreadable"):
        ClassScores.load(tmp_path / "bad.pt")


class TwiceCalled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.head = nn.Linear(1, 10)

    def forward(self, x):
        return self.head(self.conv(torch.relu(self.conv(x))).mean((2, 3)))


def test_module_called_twice_is_refused(digits):
    _, _, loader = _subset(digits, 1)
    with pytest.raises(ScoringError, match="'conv' is called more than once per forward pass"):
        score_classes(TwiceCalled(), loader, 10, digits.classes, progress=False)


def test_cache_key_includes_the_full_precision_layers(trained_digits, digits, tmp_path):
    from cpq_lib.pipeline import class_scores

    first = class_scores(trained_digits, digits, tmp_path, images_per_class=2, progress=False)
    second = class_scores(trained_digits, digits, tmp_path, images_per_class=2, exclude=("@first",), progress=False)
    assert first.full_precision == ["stem.0", "classifier"] and second.full_precision == ["stem.0"]
    assert first.settings["cache_key"] != second.settings["cache_key"]


def test_reference_class_count_is_max_over_positions_of_the_class_sum(trained_digits, digits, tmp_path):
    from cpq_lib.classpath.reference import score_classes_per_image

    _, _, loader = _subset(digits, 6)
    scores = score_classes(trained_digits, loader, 10, digits.classes, progress=False)
    per_image = score_classes_per_image(trained_digits, loader, 10, digits.classes)
    reference, summed = scores.class_count("reference"), scores.class_count("sum_of_maxima")
    for name in scores.layers:
        # the batched scorer and the one-image-per-pass loop agree on the reference count too
        assert torch.allclose(reference[name], per_image.position_counts[name].float(), atol=1e-6), name
        assert bool((reference[name] <= summed[name] + 1e-6).all()), name  # max of sums <= sum of maxima
    gaps = torch.cat([summed[n] - reference[n] for n in scores.layers])
    assert float(gaps.max()) > 0.1  # the two orders are different numbers on a trained network
    scores.save(tmp_path / "s.pt")
    loaded = ClassScores.load(tmp_path / "s.pt")
    assert all(torch.equal(loaded.position_counts[n], reference[n]) for n in scores.layers)
    image_order = score_classes(trained_digits, loader, 10, digits.classes, ScoreSettings(aggregate="image"), progress=False)
    with pytest.raises(ScoringError, match="no per-position class counts"):
        image_order.class_count("reference")
    with pytest.raises(ScoringError, match="unknown class-count order 'max'"):
        scores.class_count("max")
