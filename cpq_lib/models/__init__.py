"""Model zoo: build by name, save and load with model cards, shipped pretrained checkpoints."""

from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .normalization import InputNormalization
from .pretrained import available_pretrained, load_pretrained, pretrained_card, pretrained_path
from .registry import MODELS, build_model, count_parameters

__all__ = [
    "MODELS", "InputNormalization", "available_pretrained", "build_model", "count_parameters", "load_checkpoint",
    "load_pretrained", "pretrained_card", "pretrained_path", "read_checkpoint", "save_checkpoint",
]
