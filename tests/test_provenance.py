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
