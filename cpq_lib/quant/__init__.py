"""Quantization core: primitive, quantizers, quantized modules, model transform, BitPlan, metrics, export."""

from .bitplan import BitPlan, BitPlanError, LayerBits
from .export import export_packed, import_packed
from .metrics import layer_table, model_size_bits, model_summary
from .modules import QConv2d, QLinear, QuantizedLayer
from .primitives import fake_quantize, integer_range
from .quantizers import ActivationQuantizer, WeightQuantizer
from .transform import (
    QuantConfig, calibrate_, dequantize_, excluded_names, fold_batchnorm_, quantizable_layers, quantize_, quantized_layers,
)

__all__ = [
    "ActivationQuantizer", "BitPlan", "BitPlanError", "LayerBits", "QConv2d", "QLinear", "QuantConfig", "QuantizedLayer",
    "WeightQuantizer", "calibrate_", "dequantize_", "excluded_names", "export_packed", "fake_quantize", "fold_batchnorm_",
    "import_packed", "integer_range", "layer_table", "model_size_bits", "model_summary", "quantizable_layers",
    "quantize_", "quantized_layers",
]
