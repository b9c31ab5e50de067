"""Training and evaluation."""

from .evaluate import EvalResult, evaluate
from .schedule import SCHEDULES, learning_rate
from .trainer import TrainResult, make_optimizer, train_model

__all__ = ["EvalResult", "SCHEDULES", "TrainResult", "evaluate", "learning_rate", "make_optimizer", "train_model"]
