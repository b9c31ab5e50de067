"""BatchNorm re-estimation: exact statistics of the quantized model, restored afterwards, and what it does to a search."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cpq_lib.allocation import SearchEvaluator
from cpq_lib.quant import QuantConfig, calibrate_, quantize_
from cpq_lib.quant.batchnorm import bn_statistics, reestimate_bn_, restored_bn_statistics


def test_reestimation_gives_the_exact_mean_and_unbiased_variance_of_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5)).eval()
    batches = [(torch.randn(5, 3, 8, 8) * 2 + 1, torch.zeros(5)) for _ in range(3)]
    with torch.no_grad():
        outputs = torch.cat([model[0](x) for x, _ in batches])  # what the BN sees
    assert reestimate_bn_(model, batches) == 15
    bn = model[1]
    per_channel = outputs.transpose(0, 1).reshape(4, -1)
    # cumulative average over equal-sized batches: the mean exactly, and the mean of per-batch unbiased variances
    assert torch.allclose(bn.running_mean, per_channel.mean(1), atol=1e-5)
    batch_vars = torch.stack([model[0](x).detach().transpose(0, 1).reshape(4, -1).var(1) for x, _ in batches])
    assert torch.allclose(bn.running_var, batch_vars.mean(0), atol=1e-4)
    assert not model.training and not bn.training and bn.momentum == 0.1  # modes and momentum restored


def test_restored_statistics_survive_a_reestimation_and_an_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    before = bn_statistics(model)
    with pytest.raises(RuntimeError):
        with restored_bn_statistics(model):
            reestimate_bn_(model, [(torch.randn(4, 3, 8, 8) + 3, None)])
            assert not torch.equal(model[1].running_mean, before["1.running_mean"])
            raise RuntimeError("boom")
    after = bn_statistics(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="no images"):
        reestimate_bn_(model, [])
    assert reestimate_bn_(nn.Sequential(nn.Conv2d(3, 4, 3)), [(torch.randn(1, 3, 8, 8), None)]) == 0  # no BN: nothing


def test_search_evaluator_reestimates_bn_per_plan_and_leaves_the_model_as_it_was(digits_baseline, digits):
    data = digits.for_search()
    student = quantize_(copy.deepcopy(digits_baseline[0]), QuantConfig(weight_bits=8, act_bits=2, weight_init="mse",
                                                                        act_init="mse")).eval()
    calibrate_(student, data.calibration_loader(256))
    stale = SearchEvaluator(copy.deepcopy(student), data, bn_images=0)
    fresh = SearchEvaluator(copy.deepcopy(student), data, bn_images=512)
    bits = stale.space.uniform(2)
    before = bn_statistics(fresh.model)
    with_stale, with_fresh = stale.evaluate(bits), fresh.evaluate(bits)
    assert with_fresh.accuracy != with_stale.accuracy  # the statistics the plan is measured with matter at W2A2
    assert with_fresh.accuracy > with_stale.accuracy
    after = bn_statistics(fresh.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics restored
    assert fresh.evaluate(bits).accuracy == with_fresh.accuracy  # and so the next evaluation is the same
    assert fresh.cost()["bn_images"] == 512 and stale.cost()["bn_images"] == 0
    with pytest.raises(Exception, match="bn_images must be"):
        SearchEvaluator(student, data, bn_images=-1)


def test_a_search_result_records_its_bn_images(digits_baseline, digits):
    from cpq_lib.allocation import Target, allocate

    data = digits.for_search()
    student = quantize_(copy.deepcopy(digits_baseline[0]), QuantConfig(weight_bits=8, act_bits=4)).eval()
    calibrate_(student, data.calibration_loader(64))
    for images in (0, 100):
        result = allocate("uniform", SearchEvaluator(student, data, bn_images=images), Target(4, 4), progress=False)
        assert result.cost["bn_images"] == images
