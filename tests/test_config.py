import json

import pytest

from cpq_lib.config import ExperimentConfig, from_dict, load_config, make_config, save_config
from cpq_lib.errors import ConfigError


@pytest.mark.parametrize("profile,dataset,model", [("quick", "digits", "digits_cnn"), ("cifar10", "cifar10", "resnet20"),
                                                   ("paper", "cifar10", "resnet20")])
def test_profiles_give_their_defaults(profile, dataset, model):
    config = make_config(profile)
    assert (config.profile, config.data.name, config.model.name) == (profile, dataset, model)


def test_cifar10_profile_uses_shipped_model_and_recorded_recipe():
    config = make_config("cifar10")
    assert config.model.pretrained is True
    assert (config.train.batch_size, config.train.label_smoothing, config.train.schedule) == (128, 0.1, "onecycle")


def test_overrides_accept_dotted_and_nested_keys():
    config = make_config("quick", {"train.epochs": 3, "data": {"split_seed": 7}})
    assert config.train.epochs == 3 and config.data.split_seed == 7


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    config = make_config("cifar10", {"data.root": "somewhere.zip", "seed": 3, "train.milestones": [0.3, 0.6]})
    path = tmp_path / f"config{suffix}"
    save_config(config, path)
    assert load_config(path) == config


@pytest.mark.parametrize("overrides,field,allowed", [
    ({"train.lr": -1}, "train.lr", "minimum"),
    ({"train.epochs": 2.5}, "train.epochs", "integer"),
    ({"train.schedule": "linear"}, "train.schedule", "onecycle"),
    ({"device": "tpu"}, "device", "cuda"),
    ({"data.name": "mnist"}, "data.name", "cifar10"),
    ({"train.nesterov": "yes"}, "train.nesterov", "true or false"),
    ({"train.milestones": "0.5"}, "train.milestones", "list"),
    ({"data.val_fraction": 0.9}, "data.val_fraction", "maximum"),
])
def test_bad_values_name_field_value_and_allowed(overrides, field, allowed):
    with pytest.raises(ConfigError) as error:
        make_config("quick", overrides)
    message = str(error.value)
    assert field in message and allowed in message
    assert repr(list(overrides.values())[0]) in message or str(list(overrides.values())[0]) in message


def test_unknown_fields_are_listed_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"train: unknown field\(s\) \['lrate'\].*'lr'"):
        make_config("quick", {"train.lrate": 0.1})


def test_unknown_profile():
    with pytest.raises(ConfigError, match="'huge'.*quick"):
        make_config("huge")


def test_malformed_files(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{'profile': quick", encoding="utf-8")
    with pytest.raises(ConfigError, match="malformed"):
        load_config(bad_json)
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([1, 2]), encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)
    toml = tmp_path / "config.toml"
    toml.write_text("profile = 'quick'", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown suffix '.toml'"):
        load_config(toml)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: {epochs: [", encoding="utf-8")
    with pytest.raises(ConfigError, match="malformed"):
        load_config(bad_yaml)


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        from_dict(ExperimentConfig, {"train": 5})


def test_cuda_request_without_cuda_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert make_config("quick", {"device": "auto"}).resolved_device() == "cpu"
    with pytest.raises(ConfigError, match="no CUDA device"):
        make_config("quick", {"device": "cuda"}).resolved_device()


@pytest.mark.parametrize("overrides,message", [
    ({"train.lr": float("nan")}, "train.lr: expected a finite number, got nan"),
    ({"train.momentum": float("nan")}, "train.momentum: expected a finite number"),
    ({"train.warmup_epochs": float("inf")}, "train.warmup_epochs: expected a finite number, got inf"),
    ({"train.milestones": [0.5, -0.2]}, r"train.milestones\[1\]: -0.2 is below the minimum 0.0"),
    ({"train.milestones": [1.5]}, r"train.milestones\[0\]: 1.5 is above the maximum 1.0"),
    ({"threads": 0}, "threads: 0 is below the minimum 1"),
    ({"deterministic": 1}, "deterministic: expected true or false"),
    ({"dtype": "float16"}, r"dtype: 'float16' is not allowed; choose one of \['float32', 'float64'\]"),
])
def test_non_finite_and_out_of_range_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config("quick", overrides)


def test_nan_in_a_json_file_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"profile": "quick", "train": {"lr": NaN}}', encoding="utf-8")
    with pytest.raises(ConfigError, match="train.lr: expected a finite number"):
        load_config(path)


def test_quick_profile_pins_the_runtime_and_cifar10_matches_the_shipped_card():
    from cpq_lib.models import pretrained_card

    quick = make_config("quick")
    assert (quick.threads, quick.deterministic, quick.dtype) == (1, True, "float64")
    cifar = make_config("cifar10")
    assert (cifar.deterministic, cifar.dtype) == (False, "float32")  # the fast path
    card = pretrained_card("resnet20", "cifar10")
    assert cifar.train.epochs == card["epochs"] == 200
    for key in ("batch_size", "lr", "weight_decay", "schedule", "label_smoothing", "nesterov"):
        assert getattr(cifar.train, key) == card["train"][key], key


def test_with_overrides_validates_and_leaves_the_original():
    from cpq_lib.config import with_overrides

    config = make_config("quick")
    other = with_overrides(config, {"allocation.method": "uniform", "refine": {"epochs": 1}})
    assert (other.allocation.method, other.refine.epochs) == ("uniform", 1)
    assert (config.allocation.method, config.refine.epochs) == ("classpath", 3)
    with pytest.raises(ConfigError, match="allocation.method.*'greedy'"):
        with_overrides(config, {"allocation.method": "greedy"})
