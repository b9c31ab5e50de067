import json

from cpq_lib import __version__
from cpq_lib.config import make_config
from cpq_lib.provenance import environment_record, run_record


def test_run_record_carries_config_seed_and_environment():
    record = run_record(make_config("quick", {"seed": 5}), {"accuracy": 0.5})
    assert record["seed"] == 5 and record["config"]["train"]["epochs"] == 30
    environment = record["environment"]
    assert environment["cpq_version"] == __version__
    assert environment["torch_threads"] >= 1 and environment["torch_version"]
    assert environment["git_commit"] is None or len(environment["git_commit"].split("+")[0]) == 40
    assert json.loads(json.dumps(record)) == record  # plain JSON all the way down
    assert type(environment_record()["torch_version"]) is str


def test_environment_record_names_every_package_and_the_lock():
    import numpy
    import torch

    environment = environment_record()
    assert environment["packages"]["numpy"] == numpy.__version__
    assert environment["packages"]["torch"] == torch.__version__.split("+")[0] or environment["packages"]["torch"] == torch.__version__
    assert environment["lock"].startswith(("matches", "differs", "no lock"))
    assert environment["dtype"] in ("float32", "float64") and environment["processor"]


def test_package_summary_line_has_the_key_versions():
    from cpq_lib.provenance import package_summary

    line = package_summary({"torch": "9.9", "numpy": "1.2", "left-pad": "0.1"})
    assert line.startswith("python ") and "torch 9.9, numpy 1.2;" in line and "3 packages, differs from requirements.lock" in line
