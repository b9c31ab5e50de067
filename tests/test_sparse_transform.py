"""Focused quantization on a model: pruned weights stay zero through training, state dicts, codes out."""

from __future__ import annotations

import copy

import pytest
import torch

from cpq_lib.models import build_model
from cpq_lib.sparse import magnitude_prune_, quantize_levels
from cpq_lib.sparse.compress import compression_table, float_bits
from cpq_lib.sparse.transform import focus_quantize_, focused_codes, focused_layers, set_fraction_


def _pruned(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("digits_cnn", 10).eval()
    magnitude_prune_(model, 0.7, exclude=("stem*", "classifier"))
    return model


def test_focused_model_computes_with_levels_and_keeps_zeros_while_training():
    model = _pruned()
    table = focus_quantize_(model, bits=5)
    assert table["layer"].tolist() == ["features.0.0", "features.2.0"]
    name, module, param = focused_layers(model)[0]
    latent = module.parametrizations.weight.original.detach()
    _, levels = quantize_levels(latent * param.keep, param.weight_quantizer.layout, param.weight_quantizer.component)
    assert torch.allclose(module.weight, levels.float())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x = torch.rand(8, 1, 8, 8)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
    assert bool((module.weight[param.keep == 0] == 0).all())
    assert module.parametrizations.weight.original.grad is not None  # straight-through gradients reach the latent weight


def test_layer_scale_alpha_gets_no_weight_decay():
    from cpq_lib.config import TrainConfig
    from cpq_lib.train.trainer import make_optimizer

    model = _pruned()
    focus_quantize_(model, bits=5)
    optimizer = make_optimizer(model, TrainConfig(epochs=1, lr=0.1, weight_decay=5e-4))
    alphas = {id(param.weight_quantizer.alpha) for _, _, param in focused_layers(model)}
    undecayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]}
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert alphas and alphas <= undecayed and not alphas & decayed
    latent = {id(module.parametrizations.weight.original) for _, module, _ in focused_layers(model)}
    assert latent <= decayed  # the weights themselves still decay


def test_state_dict_round_trip_and_fraction():
    model = _pruned()
    focus_quantize_(model, bits=4, fraction=0.25)
    set_fraction_(model, 0.5)
    held = focused_layers(model)[1][2].weight_quantizer.held
    assert int(held.sum()) == round(0.5 * int((focused_layers(model)[1][2].keep != 0).sum()))
    fresh = _pruned()
    focus_quantize_(fresh, bits=4, fraction=0.0)
    with torch.no_grad():
        for _, module, _ in focused_layers(model):
            module.parametrizations.weight.original.mul_(1.01)
    fresh.load_state_dict(model.state_dict())
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_codes_feed_the_compression_table_and_bad_inputs():
    model = _pruned()
    focus_quantize_(model, bits=5)
    codes = focused_codes(model)
    table = compression_table(model, codes, coders=("ans",))
    assert table.iloc[-1]["ratio"] > 1
    assert float_bits(model) == float_bits(_pruned()) == float_bits(build_model("digits_cnn", 10))  # fp32 reference unchanged
    with pytest.raises(ValueError, match="layer 'features.0.0'.*bits must be an integer from 2"):
        focus_quantize_(_pruned(), bits=1)
    untouched = _pruned()
    before = copy.deepcopy(untouched.state_dict())
    with pytest.raises(ValueError):
        focus_quantize_(untouched, bits=1)
    assert not focused_layers(untouched) and set(untouched.state_dict()) != set(before)  # masks folded, nothing registered


def test_eval_levels_are_cached_until_anything_they_depend_on_changes():
    from cpq_lib.sparse.transform import refit_

    model = _pruned().eval()
    focus_quantize_(model, bits=5, fraction=0.5)
    _, module, param = focused_layers(model)[0]
    with torch.no_grad():
        first = module.weight
        assert module.weight is first  # computed once
        set_fraction_(model, 1.0)
        held = module.weight
        assert held is not first and not torch.equal(held, first)
        module.parametrizations.weight.original.mul_(1.5)
        grown = module.weight
        assert not torch.equal(grown, held)
        refit_(model)
        assert module.weight is not grown
        param.weight_quantizer.alpha.fill_(2.0)
        assert torch.allclose(module.weight, 2.0 * quantize_levels(module.parametrizations.weight.original * param.keep,
                                                                      param.weight_quantizer.layout, param.weight_quantizer.component)[1].float())
    model.train()
    assert module.weight.requires_grad  # training: computed every time, with gradients
