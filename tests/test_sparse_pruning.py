"""Magnitude pruning: exact sparsity per layer or globally, masks through state dicts, schedule, bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cpq_lib.models import build_model
from cpq_lib.sparse.pruning import (
    cubic_schedule, magnitude_prune_, make_permanent_, prepare_masks_, pruned_names, sparsity_table,
)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("digits_cnn", 10).eval()


def test_layer_scope_prunes_exactly_the_smallest_weights_of_every_layer():
    model = _model()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    table = magnitude_prune_(model, 0.75).set_index("layer")
    for name, weight in before.items():
        assert table.loc[name, "zeros"] == round(0.75 * weight.numel())
        pruned = dict(model.named_modules())[name].weight.detach()
        kept = weight.abs()[pruned != 0]
        assert kept.min() >= weight.abs()[pruned == 0].max()  # only the smallest went
        assert torch.equal(pruned[pruned != 0], weight[pruned != 0])


def test_global_scope_hits_the_total_and_spreads_unevenly():
    model = _model()
    table = magnitude_prune_(model, 0.6, scope="global").set_index("layer")
    total = table.loc["total"]
    assert total["zeros"] == round(0.6 * total["weights"])
    assert table.drop("total")["sparsity"].std() > 0.01


def test_repeated_pruning_keeps_earlier_zeros_and_reaches_each_target():
    model = _model()
    magnitude_prune_(model, 0.5)
    first = {n: (m.weight == 0).clone() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    table = magnitude_prune_(model, 0.8).set_index("layer")
    for name, zeros in first.items():
        weight = dict(model.named_modules())[name].weight
        assert bool((weight[zeros] == 0).all())
        assert table.loc[name, "sparsity"] == pytest.approx(round(0.8 * weight.numel()) / weight.numel())


def test_masks_survive_state_dict_and_training_steps():
    model = _model()
    magnitude_prune_(model, 0.7, exclude=("stem*",))
    state = model.state_dict()
    assert "stem.0.weight_mask" not in state and "features.0.0.weight_mask" in state
    fresh = prepare_masks_(_model(seed=1), pruned_names(state))
    fresh.load_state_dict(state)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(fresh(x), model(x))
    optimizer = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    fresh.train()
    for _ in range(3):  # masked fine-tuning: pruned weights stay zero whatever the optimizer does
        optimizer.zero_grad()
        fresh(x).sum().backward()
        optimizer.step()
    assert sparsity_table(fresh).set_index("layer").loc["features.0.0", "sparsity"] == pytest.approx(0.7, abs=1e-3)
    make_permanent_(fresh)
    assert "features.0.0.weight_mask" not in fresh.state_dict()
    assert sparsity_table(fresh).set_index("layer").loc["features.0.0", "sparsity"] == pytest.approx(0.7, abs=1e-3)


def test_cubic_schedule():
    schedule = cubic_schedule(0.9, 4)
    assert schedule[-1] == pytest.approx(0.9) and all(a < b for a, b in zip(schedule, schedule[1:]))
    assert schedule[0] == pytest.approx(0.9 - 0.9 * 0.75 ** 3)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, float("nan"), True, "0.5"])
def test_bad_sparsity_is_refused(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        magnitude_prune_(_model(), sparsity)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="scope 'row' is not allowed"):
        magnitude_prune_(_model(), 0.5, scope="row")
    tiny = nn.Sequential(nn.Linear(2, 1), nn.Linear(1, 1))  # the second layer has one weight
    with pytest.raises(ValueError, match=r"would leave layer\(s\) \['1'\] without weights"):
        magnitude_prune_(tiny, 0.6)
    assert tiny[0].weight.shape == (1, 2) and not hasattr(tiny[0], "weight_mask")  # nothing half-done
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        cubic_schedule(0.5, 0)
    with pytest.raises(ValueError, match="initial sparsity 0.6 is above the final 0.5"):
        cubic_schedule(0.5, 3, initial=0.6)


def test_per_layer_targets_first_pattern_wins_and_the_rest_stay_dense():
    model = _model()
    table = magnitude_prune_(model, {"features.0.*": 0.9, "features.*": 0.5, "classifier": 0.25}).set_index("layer")
    expected = {"stem.0": 0.0, "features.0.0": 0.9, "features.2.0": 0.5, "classifier": 0.25}
    for name, target in expected.items():
        assert table.loc[name, "zeros"] == round(target * table.loc[name, "weights"]), name
    with pytest.raises(ValueError, match="per-layer sparsities need scope='layer'"):
        magnitude_prune_(_model(), {"*": 0.5}, scope="global")
    with pytest.raises(ValueError, match=r"sparsity for 'features.\*' must be a number in \[0, 1\), got 1.5"):
        magnitude_prune_(_model(), {"features.*": 1.5})
    with pytest.raises(ValueError, match="must be \\(pattern, value\\) pairs, got 0.5"):
        magnitude_prune_(_model(), (0.5,))


def test_command_line_layer_sparsity_pairs():
    from cpq_lib.sparse.__main__ import _sparsity
    from cpq_lib.sparse.pipeline import CompressionConfig

    assert _sparsity(0.8, []) == 0.8
    pairs = _sparsity(0.8, ["layer3.*=0.9", "*shortcut*=0.5"])
    assert pairs == (("layer3.*", 0.9), ("*shortcut*", 0.5), ("*", 0.8))
    assert CompressionConfig(sparsity=dict(pairs)).sparsity == pairs  # a dict becomes the same pairs
    with pytest.raises(ValueError, match="--layer-sparsity 'layer3': expected PATTERN=VALUE"):
        _sparsity(0.8, ["layer3"])
    with pytest.raises(ValueError, match="per-layer sparsities need scope 'layer'"):
        CompressionConfig(sparsity=pairs, scope="global")
