import copy

import pytest
import torch
from torch import nn

from cpq_lib.errors import CheckpointError
from cpq_lib.models import build_model
from cpq_lib.quant import BitPlan, QuantConfig, calibrate_, export_packed, import_packed, model_summary, quantize_
from cpq_lib.quant.export import pack_codes, unpack_codes


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

    blob = zlib.compress(json.dumps({"format": "cpq-packed/1", "meta": {}}).encode())
    (tmp_path / "empty.cpq").write_bytes(MAGIC + struct.pack("<I", len(blob)) + blob)
    with pytest.raises(CheckpointError, match="no valid 'entries' list"):
        import_packed(quantize_(build_model("digits_cnn", 10, in_channels=1), QuantConfig(4, 4)), tmp_path / "empty.cpq")
