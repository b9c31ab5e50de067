"""Knowledge distillation for refining a quantized student against its full-precision teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


class Distillation:
    """``alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher || student)`` at temperature T.

    KL uses the batch mean (``reduction="batchmean"``: the true KL per sample, which "mean" is not),
    and the T^2 factor keeps the soft term's gradients comparable across temperatures (Hinton et al.).
    The teacher is put in eval mode and runs without gradients (its parameters are left as they are);
    it must not share parameters with the student.
    """

    def __init__(self, teacher: nn.Module, alpha: float = 0.3, temperature: float = 4.0) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1], got {alpha}")
        if not temperature > 0:
            raise ConfigError(f"temperature must be positive, got {temperature}")
        self.teacher = teacher.eval()  # batch norm from running statistics, no dropout
        self.alpha = alpha
        self.temperature = temperature

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                        reduction="batchmean", log_target=True)
        return self.alpha * F.cross_entropy(student_logits, labels) + (1.0 - self.alpha) * t * t * soft

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        logits = model(images)
        return self.loss(logits, teacher_logits, labels), logits
