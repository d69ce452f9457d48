"""Cluster runs: the `ray up` files, multi-node searches on loopback, node loss, shared studies."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from spvit.io import read_json_lines
from tests.postgres_fixture import postgres_server, postgres_url  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
CLUSTER_FILES = sorted((REPO / "launch" / "cluster").glob("*.yaml"))
SPACE = REPO / "search_spaces" / "digits.yaml"

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------------------ cluster files
def _load(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_there_is_a_cloud_and_an_on_premises_cluster_file():
    providers = {_load(p)["provider"]["type"] for p in CLUSTER_FILES}
    assert {"aws", "local"} <= providers


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_validates_against_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(path)
    validate_config(config)  # as written (Ray's ray-schema.json + its own checks)
    prepared = prepare_config(copy.deepcopy(config))  # as `ray up` fills it in
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_schema_validation_catches_a_broken_cluster_file(path):
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    broken = _load(path)
    broken["head_start_ray_commands"] = "ray start --head"  # must be a list of commands
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)
    typo = _load(path)
    typo["setup_command"] = typo.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(typo)


def test_aws_file_has_a_cpu_head_and_gpu_workers():
    config = _load(REPO / "launch" / "cluster" / "aws.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith(("m", "c", "r"))
    assert head["max_workers"] == 0
    workers = {name: t["node_config"]["InstanceType"] for name, t in types.items()
               if name != config["head_node_type"]}
    assert any(i.startswith("g5.") for i in workers.values())
    assert any(i.startswith("p4d.") for i in workers.values())


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_installs_the_package_and_keeps_ray_locked_down(path):
    config = _load(path)
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==2.14.1" in c)
    package_at = next(i for i, c in enumerate(setup) if "~/spvit-nas" in c and "install" in c)
    assert torch_at < package_at  # torch first, at the exact release
    assert any("ray[" in c and "==" in c for c in setup)  # the same Ray on every node
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    for start in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in start
    assert "--dashboard-host=127.0.0.1" in head_start  # dashboard and jobs: SSH tunnel only
    assert not re.search(r"(?<![\d.])0\.0\.0\.0(?![\d./])", json.dumps(config))  # no wildcard
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("/mnt/spvit" in c for c in setup)  # the shared run folder on every node
    assert any("postgres.sh start" in c for c in config["head_setup_commands"])


# ------------------------------------------------------------------------------ searches
def _search(args: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "launch.cli", "search", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def _finish(proc: subprocess.Popen, timeout: float = 420) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the search did not finish in {timeout:.0f}s:\n{out[-5000:]}")
    return out


def _metrics(trial_dir: Path) -> list[dict]:
    return read_json_lines(trial_dir / "metrics.jsonl")


def _study(run: Path, url: str | None = None) -> optuna.Study:
    from nas.storage import make_storage

    info = json.loads((run / "run.json").read_text())
    return optuna.load_study(study_name=info["study_name"], storage=make_storage(url, run))


def _trained(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    # neither constraint rejections nor re-proposals of a trained architecture (never trained)
    return [t for t in study.trials if not t.user_attrs.get("infeasible")
            and t.user_attrs.get("duplicate_of") is None]


def _tune_trial_dirs(run: Path) -> dict[str, list[str]]:
    """Optuna trial number -> the Tune trials (one per driver session) that trained it."""
    found: dict[str, list[str]] = {}
    for d in (run / "tune").glob("trial_*_*"):
        _, number, tune_id = d.name.split("_", 2)
        found.setdefault(number, []).append(tune_id)
    return found


@pytest.fixture
def loopback_cluster():
    from launch.cluster_check import LoopbackCluster

    clusters = []

    def start(**kwargs):
        cluster = LoopbackCluster(**kwargs)
        clusters.append(cluster)
        cluster.start()
        return cluster

    yield start
    for cluster in clusters:
        cluster.shutdown()


@pytest.mark.slow
def test_node_lost_mid_trial_resumes_from_its_checkpoint(loopback_cluster, tmp_path):
    """A 3-node cluster on loopback: the driver on a CPU-less head, trials on worker node A.
    Node A dies while it trains the first trial; Tune restarts the trial on node B, where it
    continues from the DeepSpeed checkpoint A left in the shared run folder."""
    cluster = loopback_cluster(head_cpus=0)
    node_a = cluster.add_node(num_cpus=1)
    run = tmp_path / "run"
    epochs = 12  # long enough that node B can join before node A's trial ends
    search = _search(["--space", str(SPACE), "--out", str(run), "--trials", "2",
                      "--concurrent", "1", "--epochs", str(epochs), "--trial-retries", "2",
                      "--seed", "3", "--address", cluster.address, "--no-export"])
    deadline = time.monotonic() + 300
    victim = None
    while victim is None:
        assert search.poll() is None, search.communicate()[0][-5000:]
        assert time.monotonic() < deadline, "no trial finished an epoch on node A"
        for trial_dir in sorted((run / "trials").glob("*")):
            lines = _metrics(trial_dir)
            if lines and lines[-1]["epoch"] <= 2:
                victim = trial_dir
        time.sleep(0.1)
    cluster.add_node(num_cpus=1)  # node B, where the trial can go on
    done_before = _metrics(victim)[-1]["epoch"]
    assert done_before < epochs, "the trial finished on node A before it could be cut short"
    cluster.remove_node(node_a)  # node A goes away mid-trial
    out = _finish(search)
    assert search.returncode == 0, out[-5000:]

    lines = _metrics(victim)
    assert [m["epoch"] for m in lines] == list(range(1, epochs + 1)), lines
    # A run that started over would have retrained (and rewritten) every epoch in one go: the
    # epochs before the node loss keep the first run's start-up time, later ones the second's.
    runs = {}
    for m in lines:
        runs.setdefault(m["startup_s"], []).append(m["epoch"])
    assert len(runs) == 2, runs
    resumed_at = min(runs[lines[-1]["startup_s"]])
    assert resumed_at > 1 and resumed_at - 1 >= done_before, (runs, done_before)
    assert not (victim / "failure.json").exists()
    assert (victim / "model.safetensors").is_file()

    trials = _trained(_study(run))
    assert len(trials) == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert all(t.user_attrs["fidelity"] == epochs for t in trials)
    other = next(t for t in trials if run / t.user_attrs["trial_dir"] != victim)
    other_lines = _metrics(run / other.user_attrs["trial_dir"])
    assert [m["epoch"] for m in other_lines] == list(range(1, epochs + 1))
    assert len({m["startup_s"] for m in other_lines}) == 1  # the other trial ran undisturbed


@pytest.mark.slow
def test_postgres_study_shared_by_two_resumed_drivers_on_two_nodes(loopback_cluster,
                                                                   postgres_url,  # noqa: F811
                                                                   tmp_path):
    """Two `spvit-nas search --resume` drivers share one PostgreSQL study and one run folder on
    a 2-node cluster: together they train exactly the budget, no trial twice, none lost."""
    cluster = loopback_cluster(head_cpus=1)
    cluster.add_node(num_cpus=1)
    run = tmp_path / "run"
    common = ["--address", cluster.address, "--no-export"]
    first = _search(["--space", str(SPACE), "--out", str(run), "--trials", "1", "--epochs", "1",
                     "--concurrent", "1", "--storage", postgres_url, "--seed", "5", *common])
    out = _finish(first)
    assert first.returncode == 0, out[-5000:]
    assert "***" in json.loads((run / "run.json").read_text())["storage"]  # no password kept

    budget = 5
    drivers = [_search(["--out", str(run), "--resume", "--trials", str(budget),
                        "--concurrent", "1", "--storage", postgres_url, *common])
               for _ in range(2)]
    outs = [_finish(d) for d in drivers]
    for d, o in zip(drivers, outs, strict=True):
        assert d.returncode == 0, o[-5000:]

    trials = _trained(_study(run, postgres_url))
    assert sorted(t.number for t in trials) == sorted({t.number for t in trials})
    assert len(trials) == budget, [(t.number, t.state.name) for t in trials]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    archs = [json.dumps(t.user_attrs["arch"], sort_keys=True) for t in trials]
    assert len(set(archs)) == len(archs)  # the two drivers did not propose the same candidates
    sessions = _tune_trial_dirs(run)
    assert sorted(int(n) for n in sessions) == sorted(t.number for t in trials)
    assert all(len(ids) == 1 for ids in sessions.values()), sessions  # none trained twice
