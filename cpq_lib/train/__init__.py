"""Training and evaluation."""

from .distill import Distillation
from .evaluate import EvalResult, evaluate
from .schedule import SCHEDULES, learning_rate
from .trainer import Objective, TrainResult, cross_entropy, make_optimizer, train_model

__all__ = ["Distillation", "EvalResult", "Objective", "cross_entropy", "SCHEDULES", "TrainResult", "evaluate", "learning_rate", "make_optimizer", "train_model"]
