import copy

import numpy as np
import pytest
import torch
from torch import nn

from cpq_lib.errors import CheckpointError
from cpq_lib.models import build_model
from cpq_lib.quant import (BitPlan, QuantConfig, calibrate_, export_packed, import_packed, model_summary, quantize_,
                           quantized_layers)
from cpq_lib.quant.export import pack_codes, read_packed, unpack_codes, write_packed


def _mixed(config, seed=0):
    torch.manual_seed(seed)
    base = build_model("resnet20", 10).eval()
    model = quantize_(copy.deepcopy(base), config)
    plan = BitPlan.from_model(model)
    generator = torch.Generator().manual_seed(seed)
    for bits in plan.layers.values():
        bits.weight = torch.randint(0, 9, (len(bits.weight),), generator=generator).tolist()
    plan.apply_(model)
    calibrate_(model, [(torch.rand(16, 3, 32, 32, generator=generator), None)])
    return base, model


@pytest.mark.parametrize("config", [
    QuantConfig(weight_bits=4, act_bits=4),
    QuantConfig(weight_bits=4, act_bits=6, symmetric=False),
    QuantConfig(weight_bits=4, act_bits=4, granularity="block", blocks=(4, 3)),
], ids=["symmetric", "asymmetric", "block"])
def test_round_trip_is_exact_and_size_matches_metric(tmp_path, config):
    base, model = _mixed(config)
    path = tmp_path / "model.cpq"
    size = export_packed(model, path)
    fresh = quantize_(copy.deepcopy(base), config)
    import_packed(fresh, path)
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    metric = model_summary(model, x)["size_bytes"]
    assert abs(size - metric) / metric < 0.02, (size, metric)


def test_block_maps_are_stored_only_for_blocks_that_are_not_contiguous(tmp_path):
    config = QuantConfig(weight_bits=4, act_bits=4, granularity="block", blocks=(4, 3))
    base, model = _mixed(config)
    x = torch.rand(4, 3, 32, 32)
    sizes = {}
    for layout in ("contiguous", "index maps"):
        if layout == "index maps":
            _regrouped_(model)
        path = tmp_path / f"{layout}.cpq"
        export_packed(model, path)
        arrays, _ = read_packed(path)
        assert (f"{FIRST}:row_groups" in arrays) == (layout == "index maps")
        fresh = quantize_(copy.deepcopy(base), config)
        import_packed(fresh, path)
        with torch.no_grad():
            assert torch.equal(fresh(x), model(x))
        sizes[layout] = model_summary(model, x)["size_bytes"]
    layers = [layer for _, layer in quantized_layers(model)]
    maps = sum(16 * (layer.weight.shape[0] + layer.weight[0].numel()) for layer in layers) / 8
    assert sizes["index maps"] - sizes["contiguous"] == pytest.approx(maps)  # the metric charges what the file holds


@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_codes(signed):
    bits = torch.tensor([0, 1, 2, 3, 8, 16, 5])
    generator = torch.Generator().manual_seed(0)
    rows = []
    for b in bits.tolist():
        if b == 0:
            rows.append(torch.zeros(10))
        elif b == 1 and signed:
            rows.append(torch.randint(0, 2, (10,), generator=generator) * 2.0 - 1)
        elif signed:
            top = 2 ** (b - 1) - 1
            rows.append(torch.randint(-top, top + 1, (10,), generator=generator).float())
        else:
            rows.append(torch.randint(0, 2 ** b, (10,), generator=generator).float())
    codes = torch.stack(rows)
    packed = pack_codes(codes, bits, signed)
    assert packed.nbytes == -(-int(bits.sum()) * 10 // 8)
    assert torch.equal(unpack_codes(packed, bits, 10, signed), codes)


def test_bad_files_and_mismatched_models(tmp_path):
    base, model = _mixed(QuantConfig(weight_bits=4, act_bits=4))
    path = tmp_path / "model.cpq"
    export_packed(model, path)
    blob = path.read_bytes()
    (tmp_path / "truncated.cpq").write_bytes(blob[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        import_packed(quantize_(copy.deepcopy(base), QuantConfig(4, 4)), tmp_path / "truncated.cpq")
    (tmp_path / "junk.cpq").write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(CheckpointError, match="bad magic"):
        import_packed(model, tmp_path / "junk.cpq")
    with pytest.raises(CheckpointError, match="layers differ"):
        import_packed(quantize_(build_model("digits_cnn", 10, in_channels=1), QuantConfig(4, 4)), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        import_packed(model, tmp_path / "missing.cpq")


class Raw(nn.Module):
    """Layers fed raw (mostly negative) inputs, with mostly negative weights: 16-bit zero points near 2^16."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 4)
        self.second = nn.Linear(4, 3)

    def forward(self, x):
        return self.second(self.first(x) - 5.0)


def test_sixteen_bit_asymmetric_zero_points_round_trip(tmp_path):
    torch.manual_seed(0)
    base = Raw().eval()
    with torch.no_grad():
        for layer in (base.first, base.second):
            layer.weight.sub_(layer.weight.max() + 0.3)  # every weight negative: zero point at the top of the grid
    config = QuantConfig(weight_bits=16, act_bits=16, symmetric=False, exclude=())
    model = quantize_(copy.deepcopy(base), config)
    x = torch.rand(8, 6) - 0.9
    calibrate_(model, [(x, None)])
    activation_zero_points = [int(model.first.input_quantizer.zero_point), int(model.second.input_quantizer.zero_point)]
    weight_zero_points = [int(model.first.weight_quantizer.zero_point.max()), int(model.second.weight_quantizer.zero_point.max())]
    assert min(activation_zero_points) > 32767 and min(weight_zero_points) > 32767  # beyond int16
    path = tmp_path / "m.cpq"
    export_packed(model, path)
    fresh = quantize_(copy.deepcopy(base), config)
    import_packed(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert [int(fresh.first.input_quantizer.zero_point), int(fresh.second.input_quantizer.zero_point)] == activation_zero_points


def test_failed_import_leaves_the_model_unchanged(tmp_path):
    torch.manual_seed(0)
    config = QuantConfig(weight_bits=4, act_bits=4)
    small = quantize_(build_model("resnet20", 10).eval(), config)
    calibrate_(small, [(torch.rand(4, 3, 32, 32), None)])
    export_packed(small, tmp_path / "ten.cpq")
    torch.manual_seed(1)
    large = quantize_(build_model("resnet20", 100).eval(), config)
    before = {k: v.clone() for k, v in large.state_dict().items()}
    with pytest.raises(CheckpointError, match="fc.weight|fc.bias|values, the model"):
        import_packed(large, tmp_path / "ten.cpq")
    after = large.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "import wrote into the model before failing"


def test_packed_file_without_entries_is_a_clear_error(tmp_path):
    import json
    import struct
    import zlib

    from cpq_lib.quant.export import MAGIC

    import hashlib

    blob = zlib.compress(json.dumps({"format": "cpq-packed/2", "meta": {}}).encode())
    body = MAGIC + struct.pack("<I", len(blob)) + blob
    (tmp_path / "empty.cpq").write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(CheckpointError, match="no valid 'entries' list"):
        import_packed(quantize_(build_model("digits_cnn", 10, in_channels=1), QuantConfig(4, 4)), tmp_path / "empty.cpq")


# --- corrupted or crafted files are refused before anything is written ---------------------------------

def _regrouped_(model):
    """Every layer's row groups reversed: blocks that are no longer contiguous runs, so maps are stored."""
    for _, layer in quantized_layers(model):
        q = layer.weight_quantizer
        q.set_groups(q.row_groups.flip(0), q.col_groups, weight=layer.weight)


def _exported(tmp_path, config=None):
    config = config or QuantConfig(weight_bits=4, act_bits=4, granularity="block", blocks=(4, 3))
    base, model = _mixed(config)
    if config.granularity == "block":
        _regrouped_(model)
    path = tmp_path / "model.cpq"
    export_packed(model, path)
    return base, model, path, config


def _rewritten(path, tmp_path, change):
    arrays, meta = read_packed(path)
    change(arrays)
    out = tmp_path / "crafted.cpq"
    write_packed(arrays, out, meta)  # a valid checksum: the content itself is bad
    return out


FIRST = "layer1.0.conv1"


@pytest.mark.parametrize("change,message", [
    (lambda a: a[f"{FIRST}:scale"].__setitem__((0, 0), np.nan), "scales that are not finite and positive"),
    (lambda a: a[f"{FIRST}:scale"].__setitem__((0, 0), -1.0), "scales that are not finite and positive"),
    (lambda a: a[f"{FIRST}:act_info"].__setitem__(0, 100), "activation bits 100 \\(allowed 1..16\\)"),
    (lambda a: a[f"{FIRST}:act_info"].__setitem__(0, -10), "activation bits -10"),
    (lambda a: a[f"{FIRST}:act_info"].__setitem__(1, 7), "sign flag 7"),
    (lambda a: a[f"{FIRST}:act_scale"].__setitem__(0, np.inf), "scale inf"),
    (lambda a: a[f"{FIRST}:row_groups"].__setitem__(0, -3), "row group indices from -3"),
    (lambda a: a[f"{FIRST}:col_groups"].__setitem__(0, 99), "column group indices from 0 to 99; allowed: 0..2"),
    (lambda a: a[f"{FIRST}:bits"].__setitem__(0, 40), "bit-widths above 16"),
])
def test_invalid_fields_are_refused_and_the_model_is_unchanged(tmp_path, change, message):
    base, _, path, config = _exported(tmp_path)
    crafted = _rewritten(path, tmp_path, change)
    target = quantize_(copy.deepcopy(base), config)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        import_packed(target, crafted)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_a_flipped_byte_anywhere_is_a_checksum_error(tmp_path):
    base, _, path, config = _exported(tmp_path)
    blob = bytearray(path.read_bytes())
    for position in (len(blob) // 2, len(blob) - 40, 20):  # payload, end of payload, header
        damaged = bytearray(blob)
        damaged[position] ^= 0x01
        (tmp_path / "damaged.cpq").write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            import_packed(quantize_(copy.deepcopy(base), config), tmp_path / "damaged.cpq")
    (tmp_path / "old.cpq").write_bytes(b"CPQPACK1" + bytes(blob[8:]))
    with pytest.raises(CheckpointError, match="format 1"):
        import_packed(quantize_(copy.deepcopy(base), config), tmp_path / "old.cpq")


def test_a_crafted_huge_shape_is_a_clear_error(tmp_path):
    import json
    import struct
    import zlib
    import hashlib

    from cpq_lib.quant.export import MAGIC

    blob = zlib.compress(json.dumps({"format": "cpq-packed/2", "meta": {},
                                     "entries": [["x:codes", "uint8", [2 ** 32, 2 ** 32]]]}).encode())
    body = MAGIC + struct.pack("<I", len(blob)) + blob + b"\0" * 16
    (tmp_path / "huge.cpq").write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(CheckpointError, match="truncated: entry 'x:codes' needs 18446744073709551616 bytes"):
        read_packed(tmp_path / "huge.cpq")


def test_activation_quantization_must_match_between_file_and_model(tmp_path):
    base, _, path, config = _exported(tmp_path)
    float_inputs = quantize_(copy.deepcopy(base), QuantConfig(weight_bits=4, act_bits=None, granularity="block", blocks=(4, 3)))
    with pytest.raises(CheckpointError, match="has activation quantization in the file and none in the model"):
        import_packed(float_inputs, path)  # it used to drop the file's activation quantization silently
    export_packed(float_inputs, tmp_path / "weights-only.cpq")
    with pytest.raises(CheckpointError, match="quantizes activations in the model and not in the file"):
        import_packed(quantize_(copy.deepcopy(base), config), tmp_path / "weights-only.cpq")


class Aliased(nn.Module):
    """One layer registered under two names (``self.b = self.a``), called twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 64)
        self.a = nn.Linear(64, 64)
        self.b = self.a
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        return self.head(self.b(self.a(self.stem(x))))


def test_an_aliased_layer_is_stored_and_counted_once(tmp_path):
    torch.manual_seed(0)
    base = Aliased().eval()
    single = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 4)).eval()
    config = QuantConfig(weight_bits=4, act_bits=8)
    x = torch.rand(4, 8)
    sizes = {}
    for label, model in (("aliased", base), ("single", single)):
        q = quantize_(copy.deepcopy(model), config)
        calibrate_(q, [(x, None)])
        summary = model_summary(q, x)
        sizes[label] = (summary["size_bytes"], summary["float_size_bytes"], summary["compression_ratio"],
                        export_packed(q, tmp_path / f"{label}.cpq"))
        if label == "aliased":
            assert q.a is q.b and summary["quantized_layers"] == 1  # one quantized twin under both names (stem, head excluded)
            fresh = quantize_(copy.deepcopy(base), config)
            import_packed(fresh, tmp_path / "aliased.cpq")
            assert fresh.a is fresh.b
            with torch.no_grad():
                assert torch.equal(fresh(x), q(x))
    aliased, single_sizes = sizes["aliased"], sizes["single"]
    assert aliased[:3] == single_sizes[:3]  # were 14,206 vs 4,926 bytes, ratio 1.481 vs 2.386 in the model
    assert abs(aliased[3] - single_sizes[3]) < 200  # the header names differ; the payload is the same


def test_full_grid_round_trips_and_a_grid_mismatch_is_refused(tmp_path):
    from cpq_lib.errors import CheckpointError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    full = quantize_(copy.deepcopy(model), QuantConfig(weight_bits=2, act_bits=None, weight_grid="full",
                                                       exclude=()))
    export_packed(full, tmp_path / "full.cpq")
    again = quantize_(copy.deepcopy(model), QuantConfig(weight_bits=2, act_bits=None, weight_grid="full", exclude=()))
    import_packed(again, tmp_path / "full.cpq")
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(full(x), again(x))
    codes = full[0].weight_quantizer.codes(full[0].weight)
    assert float(codes.min()) == -2.0  # the fourth level is used and survives packing
    narrow = quantize_(copy.deepcopy(model), QuantConfig(weight_bits=2, act_bits=None, exclude=()))
    with pytest.raises(CheckpointError, match="written on the full weight grid, the model quantizes on the narrow one"):
        import_packed(narrow, tmp_path / "full.cpq")
