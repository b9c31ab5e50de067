"""Coded model size: exact decode of every coded layer, totals and ratio against fp32, entropy bound."""

from __future__ import annotations

import pytest
import torch

from cpq_lib.models import build_model
from cpq_lib.sparse import magnitude_prune_, plan_layer, quantize_levels
from cpq_lib.sparse.compress import code_layer, compression_table, decode_layer, float_bits


def _pruned_model():
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10).eval()
    magnitude_prune_(model, 0.8, exclude=("stem*", "classifier"))
    return model


def _focused_codes(model):
    codes = {}
    for name in ("features.0.0", "features.2.0"):
        weight = dict(model.named_modules())[name].weight.detach()
        layout, _, component = plan_layer(weight, bits=5)
        codes[name] = (quantize_levels(weight, layout, component)[0], 32 * (2 * len(layout.centres) + 3))
    return codes


@pytest.mark.parametrize("coder", ["huffman", "ans", "zstd"])
def test_every_coded_layer_decodes_exactly(coder):
    model = _pruned_model()
    for codes, header in _focused_codes(model).values():
        layer = code_layer(codes, header, coder, max_gap=7)
        assert torch.equal(decode_layer(layer), codes)


def test_compression_table_totals_and_ratio():
    model = _pruned_model()
    codes = _focused_codes(model)
    table = compression_table(model, codes, max_gap=15)
    state = model.state_dict()
    plain = sum(t.numel() for k, t in state.items() if t.is_floating_point() and not k.endswith("weight_mask")
                and "num_batches" not in k)
    assert float_bits(model) == 32 * plain
    coded_weights = sum(c.numel() for c, _ in codes.values())
    for coder, part in table.groupby("coder"):
        layers, total = part[part["layer"] != "total"], part[part["layer"] == "total"].iloc[0]
        assert total["bits"] == layers["bits"].sum() + 32 * (plain - coded_weights)
        assert total["ratio"] == pytest.approx(32 * plain / total["bits"])
    ans = table[(table["coder"] == "ans") & (table["layer"] != "total")]
    assert ((ans["index_bits"] + ans["code_bits"]) <= 1.02 * ans["entropy_bits"] + 2 * (32 + 32) * 40).all()
    with pytest.raises(ValueError, match="no layer"):
        compression_table(model, {"nope": codes["features.0.0"]})
    with pytest.raises(ValueError, match="coders"):
        compression_table(model, codes, coders=("gzip",))


def test_payload_and_tables_add_up():
    model = _pruned_model()
    table = compression_table(model, _focused_codes(model), coders=("huffman", "ans"))
    layers = table[table["layer"] != "total"]
    assert (layers["payload_bits"] + layers["table_bits"] == layers["index_bits"] + layers["code_bits"]).all()
    huffman = layers[layers["coder"] == "huffman"]
    assert (huffman["payload_bits"] >= huffman["entropy_bits"] - 1e-6).all()  # no order-0 code beats the entropy
