"""Knowledge distillation: the loss formula, and refinement lifting a 2-bit student."""

import copy

import pytest
import torch
import torch.nn.functional as F

from cpq_lib.config import make_config
from cpq_lib.errors import ConfigError
from cpq_lib.quant import BitPlan, QuantConfig, calibrate_, quantize_
from cpq_lib.train import Distillation, evaluate, train_model


def test_loss_is_alpha_ce_plus_scaled_kl():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 5, generator=generator).unbind(0)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    kd = Distillation(torch.nn.Identity(), alpha=0.3, temperature=4.0)
    p_teacher = F.softmax(teacher / 4, dim=1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / 4, dim=1))).sum(1).mean()  # per-sample KL, batch mean
    expected = 0.3 * F.cross_entropy(student, labels) + 0.7 * 16 * kl
    assert kd.loss(student, teacher, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    assert Distillation(torch.nn.Identity(), alpha=1.0).loss(student, teacher, labels).item() == pytest.approx(
        F.cross_entropy(student, labels).item())
    assert Distillation(torch.nn.Identity(), alpha=0.0).loss(teacher, teacher, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_is_frozen_in_eval_mode_and_bad_settings_are_refused():
    teacher = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5)).train()
    kd = Distillation(teacher)
    assert not teacher.training and all(p.requires_grad for p in teacher.parameters())  # the caller's model, not frozen
    x = torch.randn(4, 3)
    _, logits = kd(torch.nn.Linear(3, 2), x, torch.tensor([0, 1, 0, 1]))
    assert logits.requires_grad and teacher[0].weight.grad is None
    with pytest.raises(ConfigError, match="alpha"):
        Distillation(teacher, alpha=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        Distillation(teacher, temperature=0)


def test_refinement_lifts_a_two_bit_digits_cnn(digits_baseline, digits):
    teacher = copy.deepcopy(digits_baseline[0])
    data = digits.for_search()
    student = quantize_(copy.deepcopy(teacher), QuantConfig(weight_bits=8, act_bits=2, weight_init="mse", act_init="mse",
                                                            learnable_scales=True)).eval()
    calibrate_(student, data.calibration_loader(256))
    BitPlan.uniform(student, 2, 2).apply_(student)
    before = evaluate(student, data.eval_loader("val"), 10).accuracy
    config = make_config("quick").refine
    torch.manual_seed(0)
    result = train_model(student, data, config, seed=0, progress=False, objective=Distillation(teacher, 0.3, 4.0))
    after = evaluate(student, data.eval_loader("val"), 10).accuracy
    assert after >= before + 0.1 and after > 0.9, (before, after)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert BitPlan.from_model(student).layers == BitPlan.uniform(student, 2, 2).layers  # bits unchanged by training


def test_step_budget_ends_inside_an_epoch(digits_baseline, digits):
    config = make_config("quick", {"refine.max_steps": 25}).refine  # 21 steps per epoch at batch 64
    model = copy.deepcopy(digits_baseline[0])
    result = train_model(model, digits.for_search(), config, seed=0, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2]
