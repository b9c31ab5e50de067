"""Dynamic network surgery: masks follow the weights in training, cut weights grow back, state resumes exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cpq_lib.models import build_model
from cpq_lib.sparse.surgery import (
    SurgeryMask, fold_surgery_, prepare_surgery_, surgery_layers, surgery_names, surgery_prune_,
)


def test_mask_starts_at_the_target_cuts_and_splices_with_hysteresis():
    weight = torch.arange(1, 101, dtype=torch.float32).view(10, 10) / 100  # magnitudes 0.01 .. 1.00
    mask = SurgeryMask(weight, target=0.3, hysteresis=0.1)
    assert int((mask.mask == 0).sum()) == 30 and bool((mask.mask.view(-1)[:30] == 0).all())
    moved = weight.clone()
    moved.view(-1)[0] = 0.9    # a cut weight grew far past the threshold: spliced back
    moved.view(-1)[99] = 0.001  # an active one shrank to nothing: cut
    moved.view(-1)[31] = 0.29  # inside the band (q ~ 0.30 +- 10%): keeps its state (active)
    moved.view(-1)[28] = 0.31  # inside the band: keeps its state (cut)
    mask.train()
    with torch.enable_grad():
        out = mask(moved.requires_grad_(True))
    flat = mask.mask.view(-1)
    assert flat[0] == 1 and flat[99] == 0 and flat[31] == 1 and flat[28] == 0
    assert torch.equal(out.detach(), moved.detach() * mask.mask) and int(mask.updates) == 1
    out.sum().backward()
    assert torch.equal(moved.grad, torch.ones_like(moved))  # straight-through: cut weights get gradients too
    mask.eval()
    before = mask.mask.clone()
    mask(torch.zeros_like(weight))  # eval: no update
    assert torch.equal(mask.mask, before)
    with pytest.raises(ValueError, match="hysteresis must be in"):
        SurgeryMask(weight, 0.3, hysteresis=1.0)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("digits_cnn", 10)


def _train(model: nn.Module, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.rand(16, 1, 8, 8, generator=generator)
        y = torch.randint(0, 10, (16,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_training_keeps_sparsity_near_target_and_weights_come_back():
    model = _model()
    table = surgery_prune_(model, {"features.*": 0.7}).set_index("layer")
    assert table.loc["stem.0", "sparsity"] == 0.0 and table.loc["features.0.0", "sparsity"] == pytest.approx(0.7, abs=1e-3)
    start = {name: mask.mask.clone() for name, _, mask in surgery_layers(model)}
    _train(model, 20)
    for name, module, mask in surgery_layers(model):
        if name.startswith("features"):
            sparsity = float((mask.mask == 0).double().mean())
            assert abs(sparsity - 0.7) < 0.05, (name, sparsity)
            assert bool(((start[name] == 0) & (mask.mask == 1)).any()), name  # some cut weights grew back
    surgery_prune_(model, {"features.*": 0.8})  # the next step of a schedule only moves the targets
    assert len(surgery_layers(model)) == 4 and float(surgery_layers(model)[1][2].target) == 0.8


def test_state_dict_resumes_exactly_and_folding_leaves_plain_zeros():
    model = _model()
    surgery_prune_(model, 0.6, exclude=("stem*", "classifier"))
    _train(model, 5)
    state = copy.deepcopy(model.state_dict())
    fresh = prepare_surgery_(_model(seed=3), surgery_names(state))
    fresh.load_state_dict(state)
    _train(model, 5, seed=2)
    _train(fresh, 5, seed=2)
    for (_, a, ma), (_, b, mb) in zip(surgery_layers(model), surgery_layers(fresh)):
        assert torch.equal(ma.mask, mb.mask) and torch.equal(a.parametrizations.weight.original, b.parametrizations.weight.original)
    x = torch.rand(4, 1, 8, 8)
    model.eval()
    expected = model(x)
    fold_surgery_(model)
    assert not surgery_layers(model) and isinstance(model.features[0][0].weight, nn.Parameter)
    assert torch.equal(model(x), expected)
    zeros = float((model.features[0][0].weight == 0).double().mean())
    assert abs(zeros - 0.6) < 0.05


def test_pipeline_with_surgery(digits_baseline, digits, tmp_path):
    from cpq_lib.config import TrainConfig
    from cpq_lib.sparse.pipeline import CompressionConfig, compress_model

    model, _ = digits_baseline
    config = CompressionConfig(sparsity=0.7, pruning="surgery", prune_steps=2, bits=5, baseline_bits=4, fractions=(1.0,))
    result = compress_model(model, digits, config, TrainConfig(epochs=1, lr=0.01, schedule="cosine", batch_size=64),
                            tmp_path, progress=False)
    stages = result["stages"].set_index("stage")
    # measured, not the target: masks settle inside the hysteresis band (+-10% of the threshold magnitude),
    # which holds about a tenth of a layer's weights around the target's quantile
    measured = stages.loc["pruned 2/2", "sparsity"]
    assert measured != 0.7 and abs(measured - 0.7) < 0.1
    focused = result["models"]["focused"]
    zeros = [int((focused.get_submodule(name).weight == 0).sum()) for name in result["layers"]["layer"]]
    weights = [focused.get_submodule(name).weight.numel() for name in result["layers"]["layer"]]
    assert sum(zeros) / sum(weights) >= measured - 1e-12  # the folded masks stay zero (quantization may add zeros)
    for z, w in zip(zeros, weights):
        assert abs(z / w - 0.7) < 0.1
    with pytest.raises(ValueError, match="pruning 'surgery' needs scope 'layer' and prune_epochs >= 1"):
        CompressionConfig(pruning="surgery", prune_epochs=0)
    with pytest.raises(ValueError, match="pruning 'regrow' is not allowed"):
        CompressionConfig(pruning="regrow")
