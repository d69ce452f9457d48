"""Nothing stops early or silently: a resume trains to the epochs its folder was started for
(`train` and `supernet train`), `supernet train --resume` without a checkpoint is refused, a
trial stopped by its scheduler on its last epoch still has its weights (ASHA stops every trial
that reaches the budget), and a local search starts a Ray instance of its own instead of joining
one it finds on the machine."""

from __future__ import annotations

import json

import pytest
import yaml
from optuna.trial import TrialState

from launch import cli
from launch.cli import main
from tests.tiny_space import tiny_space


def spvit_nas(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_space(epochs=1)))
    return path


# ---------------------------------------------------------------------------- Ray isolation
def test_a_local_instance_never_joins_another_one_on_the_machine(monkeypatch):
    """`init_ray()` without an address passes Ray arguments that start a new instance even
    while another one runs here (Ray's own default, no address, joins the one it finds)."""
    import ray
    from ray._private import services

    from launch import ray_env

    calls: list[dict] = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: None)
    ray_env.init_ray(num_cpus=2)
    (kwargs,) = calls
    assert kwargs["num_cpus"] == 2 and kwargs["include_dashboard"] is False
    # Another Ray instance on this machine, as Ray's discovery would find it:
    other = "127.0.0.1:6399"
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir=None: other)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [other])
    assert services.canonicalize_bootstrap_address(None) == other  # what no address would do
    assert services.canonicalize_bootstrap_address(kwargs.get("address")) is None  # start one
    # Told to join, it joins (and never sizes the cluster).
    calls.clear()
    monkeypatch.setattr(ray_env, "check_auth_mode", lambda: None)
    monkeypatch.setattr(ray_env, "ensure_token_auth", lambda joining: None)
    ray_env.init_ray("10.0.0.1:6379", num_cpus=2)
    assert calls[0]["address"] == "10.0.0.1:6379" and "num_cpus" not in calls[0]


# ---------------------------------------------------------------------------- resume refusals
def test_supernet_resume_without_a_checkpoint_is_refused(tmp_path, space_file, capsys):
    out = tmp_path / "never-trained"
    code, _, err = spvit_nas(capsys, "supernet", "train", "--space", space_file, "--out", out,
                             "--resume")
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "holds no supernet checkpoint to resume" in lines[0]
    assert "Drop --resume" in lines[0]
    assert not out.exists()  # nothing trained, nothing written


# ---------------------------------------------------------------------------- resume targets
class Interrupt(BaseException):
    """What Ctrl-C does to a run after an epoch's checkpoint (not an `Exception`: no failure
    is recorded)."""


@pytest.mark.slow
def test_train_resume_trains_to_the_folders_epochs(tmp_path, capsys, monkeypatch):
    import launch.trial

    out = tmp_path / "train"
    real = launch.trial.run_candidate

    def interrupted_after_epoch_1(*args, on_epoch=None, **kwargs):
        def stop(metrics):
            on_epoch(metrics)
            raise Interrupt

        return real(*args, on_epoch=stop, **kwargs)

    monkeypatch.setattr(launch.trial, "run_candidate", interrupted_after_epoch_1)
    with pytest.raises(Interrupt):
        main(["train", "--arch", "spvit_test", "--out", str(out), "--epochs", "2"])
    monkeypatch.setattr(launch.trial, "run_candidate", real)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["epoch"] == 1
    capsys.readouterr()

    code, printed, _ = spvit_nas(capsys, "train", "--arch", "spvit_test", "--out", out,
                                 "--resume")
    assert code == 0
    assert "epoch 2/2" in printed  # the folder's target, not the default recipe's
    assert yaml.safe_load((out / "training.yaml").read_text())["epochs"] == 2
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 2 and state["training"]["epochs"] == 2
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_supernet_resume_trains_to_the_recorded_epochs(tmp_path, space_file, capsys):
    from launch.supernet import train_supernet
    from search_spaces.space import SearchSpace

    out = tmp_path / "sn"
    space = SearchSpace.load(space_file)
    space = space.__class__(**{**space.__dict__,
                               "training": space.training.replace(epochs=2)})

    def stop(line):
        raise Interrupt

    with pytest.raises(Interrupt):
        train_supernet(space, out, on_epoch=stop)
    assert json.loads((out / "supernet.json").read_text())["epochs"] == 2  # the target
    capsys.readouterr()

    # the space file says 1 epoch; the folder was started for 2
    code, printed, _ = spvit_nas(capsys, "supernet", "train", "--space", space_file, "--out",
                                 out, "--resume")
    assert code == 0 and "epoch 2/2" in printed
    info = json.loads((out / "supernet.json").read_text())
    assert info["epochs_trained"] == 2 and info["epochs"] == 2
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]


# ---------------------------------------------------------------------------- weights
@pytest.mark.slow
def test_a_trial_stopped_on_its_last_report_has_its_weights(tmp_path):
    """Tune stops a trial by raising SystemExit from its report(); ASHA does so on the report of
    the last epoch of every trial that reaches the budget."""
    from launch.trial import run_candidate
    from search_spaces.training import TrainingConfig
    from spvit.arch import ArchSpec

    spec = ArchSpec.uniform(depth=1, heads=1, embed_dim=16, img_size=16, patch_size=4,
                            in_chans=1, num_classes=10, head="avg")
    trial = tmp_path / "t"

    def stop_at_the_budget(metrics):
        if metrics["epoch"] == 1:
            raise SystemExit(0)

    with pytest.raises(SystemExit):
        run_candidate(spec, TrainingConfig(epochs=1, batch_size=128), trial,
                      on_epoch=stop_at_the_budget)
    assert (trial / "model.safetensors").is_file() and (trial / "arch.yaml").is_file()


@pytest.mark.slow
def test_an_asha_search_exports_and_every_complete_trial_has_weights(tmp_path, ray_local):
    from launch.search import EXIT_OK, SearchRequest, run_search
    from nas.storage import make_storage

    space = tmp_path / "tiny.yaml"
    data = tiny_space(epochs=1)
    space.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "asha"
    outcome = run_search(SearchRequest(out=run_dir, space=space, trials=2, concurrent=1,
                                       scheduler="asha"), say=lambda line: None)
    assert outcome.exit_code == EXIT_OK, outcome.message
    import optuna

    study = optuna.load_study(study_name="asha", storage=make_storage(None, run_dir))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    assert complete
    for t in complete:
        assert (run_dir / t.user_attrs["trial_dir"] / "model.safetensors").is_file(), t.number
    assert outcome.export_dir is not None and (outcome.export_dir / "model.safetensors").is_file()

    # A run from before trials wrote their weights first: --resume writes them from the final
    # checkpoint.
    lost = run_dir / complete[0].user_attrs["trial_dir"] / "model.safetensors"
    lost.unlink()
    said: list[str] = []
    outcome = run_search(SearchRequest(out=run_dir, resume=True), say=said.append)
    assert outcome.exit_code == EXIT_OK, outcome.message
    assert lost.is_file() and any("wrote its missing model.safetensors" in s for s in said)


# ---------------------------------------------------------------------------- before training
@pytest.mark.parametrize("flags, needle", [
    (["--cpus-per-worker", "0"], "--cpus-per-worker must be > 0"),
    (["--workers", "64"], "needs 64 CPUs"),
    (["--use-gpu"], "need 1 GPU(s), but this machine has 0"),
])
def test_supernet_train_checks_this_machine_before_writing(tmp_path, space_file, capsys,
                                                          monkeypatch, flags, needle):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "sn"
    code, _, err = spvit_nas(capsys, "supernet", "train", "--space", space_file, "--out", out,
                             *flags)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert not out.exists()  # no space.yaml, no supernet.json, no Ray waiting forever


def test_a_broken_recipe_is_one_line_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "recipe.yaml"
    bad.write_text("epochs: [\n")
    code, _, err = spvit_nas(capsys, "train", "--arch", "spvit_test", "--out",
                             tmp_path / "out", "--training", bad)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"--training file {bad}" in lines[0], err
    # with --resume the folder's own recipe is read, and named as such
    folder = tmp_path / "resumed"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "training.yaml").write_text("- 1\n")
    code, _, err = spvit_nas(capsys, "train", "--arch", "spvit_test", "--out", folder,
                             "--resume")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--resume: the folder's recipe" in lines[0], err
    assert "--training" not in lines[0]


def test_search_names_only_its_own_flags_when_the_machine_is_too_small(tmp_path, space_file,
                                                                       capsys):
    code, _, err = spvit_nas(capsys, "search", "--space", space_file, "--out", tmp_path / "r",
                             "--workers-per-trial", 64)
    assert code == 2 and "needs 64 CPUs" in err and "--cpus-per-worker" not in err
