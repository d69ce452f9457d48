"""Training one candidate: in-process and under Ray Train/Tune, resume, failures, weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from launch.trial import (
    TrialFailed,
    candidate_trainable,
    default_path,
    run_candidate,
    trainable_resources,
)
from launch.worker import METRIC_KEYS, TEST_METRIC_KEYS
from nas.data import build_datasets
from nas.engine import evaluate
from search_spaces.training import TrainingConfig
from spvit import create_model
from spvit.arch import ArchSpec
from spvit.errors import ConfigError

pytestmark = pytest.mark.slow

SPEC = ArchSpec.uniform(depth=2, heads=2, embed_dim=32, img_size=16, patch_size=2, in_chans=1,
                        num_classes=10, head="avg")


def recipe(**kw) -> TrainingConfig:
    base = dict(epochs=1, batch_size=64, lr=2e-3, min_lr=1e-5, warmup_epochs=1.0)
    base.update(kw)
    return TrainingConfig(**base)


def read_lines(trial_dir):
    return [json.loads(s) for s in (trial_dir / "metrics.jsonl").read_text().splitlines()]


def evaluate_saved_weights(trial_dir, training, split="val"):
    """Full-`split` metrics of trial_dir/model.safetensors, computed here in one process."""
    spec = ArchSpec.load(trial_dir / "arch.yaml")
    model = create_model(spec)
    model.load_state_dict(load_file(trial_dir / "model.safetensors"))
    data = getattr(build_datasets(training, spec), split)
    return evaluate(model, DataLoader(data, batch_size=100), device=torch.device("cpu"))


def lr_reference(training: TrainingConfig, steps_per_epoch: int, step: int) -> float:
    """Linear warm-up from min_lr, then cosine to min_lr at the last step (0-based step)."""
    total = training.epochs * steps_per_epoch
    warmup = max(2, round(training.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return training.min_lr + (training.lr - training.min_lr) * step / warmup
    progress = min(1.0, (step - warmup + 1) / (total - warmup))
    cosine = (1 + math.cos(math.pi * progress)) / 2
    return training.min_lr + (training.lr - training.min_lr) * cosine


def test_one_epoch_in_process_writes_the_trial_folder(tmp_path):
    trial = tmp_path / "t"
    training = recipe()
    seen = []
    out = run_candidate(SPEC, training, trial, on_epoch=seen.append)
    lines = read_lines(trial)
    # One epoch is the full budget: its line also holds the held-out test split's metrics.
    assert len(lines) == 1 and set(lines[0]) == set(METRIC_KEYS + TEST_METRIC_KEYS)
    assert 0.0 <= lines[0]["test_acc"] <= 1.0
    assert seen == [{**lines[0], "fidelity": 1}] and out == seen[0]
    ds = json.loads((trial / "ds_config.json").read_text())
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (64, 64)
    state = json.loads((trial / "checkpoint" / "state.json").read_text())
    assert state["shards"] == [{"rank": 0, "train_images": 1079, "steps_per_epoch": 16,
                                "val_images": 359}]
    assert (trial / "checkpoint" / "latest").read_text() == "epoch_0001"
    assert ArchSpec.load(trial / "arch.yaml") == SPEC
    assert not (trial / "failure.json").exists()
    # The schedule DeepSpeed ran is the documented one (16 steps: lr of the 16th step).
    assert lines[0]["lr"] == pytest.approx(lr_reference(training, 16, 15), rel=1e-9)
    assert lines[0]["startup_s"] > 0 and lines[0]["wall_s"] > 0 and lines[0]["images_per_s"] > 0
    # The consolidated weights reproduce the reported validation metrics.
    again = evaluate_saved_weights(trial, training)
    assert again.acc1 == pytest.approx(lines[0]["val_acc"], abs=1.5 / 359)
    assert again.loss == pytest.approx(lines[0]["val_loss"], rel=1e-4)
    # ... and the held-out test metrics, evaluated on the test split, not on validation.
    test = evaluate_saved_weights(trial, training, split="test")
    assert test.acc1 == pytest.approx(lines[0]["test_acc"], abs=1.5 / 359)
    assert test.loss == pytest.approx(lines[0]["test_loss"], rel=1e-4)
    assert test.loss != pytest.approx(again.loss, rel=1e-6)


@pytest.mark.parametrize("bf16, zero_stage", [(True, 0), (False, 3)])
def test_weights_are_consolidated_fp32_masters_under_bf16_and_zero3(tmp_path, bf16, zero_stage):
    trial = tmp_path / "t"
    training = recipe(bf16=bf16, zero_stage=zero_stage)
    out = run_candidate(SPEC, training, trial)
    weights = load_file(trial / "model.safetensors")
    model = create_model(SPEC)
    model.load_state_dict(weights)  # strict: every (gathered, full-size) tensor is there
    assert {w.dtype for w in weights.values()} == {torch.float32}
    if bf16:
        # From the fp32 master copies, not the bf16 module (which would round-trip exactly).
        big = [w for w in weights.values() if w.numel() > 16]
        assert not all(torch.equal(w, w.bfloat16().float()) for w in big)
    again = evaluate_saved_weights(trial, training)
    assert again.acc1 == pytest.approx(out["val_acc"], abs=(10 if bf16 else 1.5) / 359)


class Killed(Exception):
    pass


def _optimizer_state(trial_dir, epoch):
    path = trial_dir / "checkpoint" / f"epoch_{epoch:04d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=True)


def test_resume_continues_at_the_next_epoch_with_the_same_optimizer_state(tmp_path):
    training = recipe(epochs=3)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_candidate(SPEC, training, straight)

    def kill_after_first_epoch(metrics):
        if metrics["epoch"] == 1:
            raise Killed("stopped after epoch 1")

    with pytest.raises(TrialFailed, match="Killed: stopped after epoch 1"):
        run_candidate(SPEC, training, resumed, on_epoch=kill_after_first_epoch)
    assert json.loads((resumed / "failure.json").read_text())["reason"] == \
        "Killed: stopped after epoch 1"
    first = read_lines(resumed)
    assert [m["epoch"] for m in first] == [1]
    # A kill in the middle of saving epoch 2 leaves a partial folder; it must not be used.
    partial = resumed / "checkpoint" / "epoch_0002"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")

    seen = []
    run_candidate(SPEC, training, resumed, on_epoch=seen.append)
    assert [m["epoch"] for m in seen] == [2, 3]
    assert not (resumed / "failure.json").exists() and not partial.exists()
    lines = read_lines(resumed)
    assert [m["epoch"] for m in lines] == [1, 2, 3] and lines[0] == first[0]
    # The test split is evaluated once, after the last epoch of the budget only.
    assert [("test_acc" in m) for m in lines] == [False, False, True]

    a, b = _optimizer_state(straight, 3), _optimizer_state(resumed, 3)
    assert a["lr_scheduler"] == b["lr_scheduler"] == {"last_batch_iteration": 3 * 16 - 1}
    assert a["global_steps"] == b["global_steps"] == 48
    for key, sa in a["optimizer"]["state"].items():
        sb = b["optimizer"]["state"][key]
        assert float(sa["step"]) == float(sb["step"]) == 48
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa[name], sb[name], rtol=1e-5, atol=1e-8)
    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)
    straight_lines = read_lines(straight)
    assert straight_lines[-1]["val_acc"] == pytest.approx(lines[-1]["val_acc"], abs=1.5 / 359)
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]  # it learns (3 epochs: loss, not acc)

    # Started again once finished: nothing to train, the last epoch is reported again.
    seen = []
    out = run_candidate(SPEC, training, resumed, on_epoch=seen.append)
    assert seen == [out] and out["epoch"] == 3 and out["val_acc"] == lines[-1]["val_acc"]
    # A different recipe cannot continue this checkpoint.
    with pytest.raises(ConfigError, match="training.lr=0.002"):
        run_candidate(SPEC, training.replace(lr=1e-3), resumed)


class _Payload:
    """Unpickling this runs a shell command: what a tampered checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_zero2_resume_loads_checkpoints_weights_only(tmp_path):
    training = recipe(epochs=2, zero_stage=2)

    def stop_after_first_epoch(metrics):
        if metrics["epoch"] == 1:
            raise Killed("stopped after epoch 1")

    good, bad = tmp_path / "good", tmp_path / "bad"
    for trial_dir in (good, bad):
        with pytest.raises(TrialFailed):
            run_candidate(SPEC, training, trial_dir, on_epoch=stop_after_first_epoch)
    # ZeRO-2 optimizer states pickle two DeepSpeed classes; the weights-only loader allows them.
    seen = []
    run_candidate(SPEC, training, good, on_epoch=seen.append)
    assert [m["epoch"] for m in seen] == [2]

    # A tampered checkpoint is refused, never executed.
    marker = tmp_path / "executed"
    states = next((bad / "checkpoint" / "epoch_0001").glob("*model_states.pt"))
    torch.save({"module": _Payload(marker)}, states)
    with pytest.raises(TrialFailed, match="(?i)weights.only|unsupported global"):
        run_candidate(SPEC, training, bad)
    assert not marker.exists()


def test_nan_loss_fails_the_trial_with_a_reason(tmp_path):
    trial = tmp_path / "t"
    training = recipe(lr=1e10, min_lr=1e10, warmup_epochs=0.0, grad_clip=0.0)
    with pytest.raises(TrialFailed, match=r"loss became (nan|inf) at epoch 1 step \d+") as e:
        run_candidate(SPEC, training, trial)
    reason = json.loads((trial / "failure.json").read_text())["reason"]
    assert reason == e.value.reason and reason.endswith("lower training.lr or enable grad_clip"
                                                         " (training.grad_clip > 0)")
    assert not (trial / "model.safetensors").exists()


def test_a_trial_stopped_early_is_not_a_failure(tmp_path):
    """Tune stops an early-stopped trial by raising SystemExit from its report()."""
    trial = tmp_path / "t"

    def stop_after_first_epoch(metrics):
        raise SystemExit(0)

    with pytest.raises(SystemExit):
        run_candidate(SPEC, recipe(epochs=2), trial, on_epoch=stop_after_first_epoch)
    assert not (trial / "failure.json").exists()
    assert [m["epoch"] for m in read_lines(trial)] == [1]
    assert json.loads((trial / "checkpoint" / "state.json").read_text())["epoch"] == 1


def test_bad_input_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="num_classes: 10"):
        run_candidate(SPEC.replace(num_classes=5), recipe(), tmp_path / "a")
    with pytest.raises(ConfigError, match="multiple of 3"):
        run_candidate(SPEC, recipe(), tmp_path / "b", workers=3)
    with pytest.raises(ConfigError, match="exactly one worker"):
        run_candidate(SPEC, recipe(), tmp_path / "c", workers=2, path="inprocess")
    assert not any(tmp_path.iterdir())


def test_resources_follow_the_path():
    assert default_path(1) == "inprocess" and default_path(2) == "ray_train"
    assert trainable_resources(1, False) == {"cpu": 1.0}
    assert trainable_resources(1, True) == {"cpu": 1.0, "gpu": 1}
    assert trainable_resources(4, True) == {"cpu": 0.01}


def test_candidate_trainable_in_tune_with_one_and_two_workers(ray_local, tmp_path):
    from ray import tune
    from ray.tune.execution.placement_groups import PlacementGroupFactory

    training = recipe(batch_size=64)

    def resources(config):
        spec = trainable_resources(config["workers"], config["use_gpu"],
                                   cpus_per_worker=config["cpus_per_worker"])
        return PlacementGroupFactory([{k.upper(): v for k, v in spec.items()}])

    # Two CPUs hold both trials at once: 0.5 for the in-process one, 0.01 + 2 x 0.5 for the
    # Ray Train one.
    param_space = {
        "arch": SPEC.to_flat(), "training": training.to_dict(), "use_gpu": False,
        "cpus_per_worker": 0.5, "workers": tune.grid_search([1, 2]),
        "trial_dir": tune.sample_from(lambda s: str(tmp_path / f"w{s.config['workers']}")),
    }
    tuner = tune.Tuner(
        tune.with_resources(candidate_trainable, resources), param_space=param_space,
        tune_config=tune.TuneConfig(metric="val_acc", mode="max"),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="paths",
                                  verbose=0))
    results = tuner.fit()
    assert not results.errors
    by_workers = {r.config["workers"]: r for r in results}
    for workers, result in by_workers.items():
        trial = tmp_path / f"w{workers}"
        lines = read_lines(trial)
        assert len(lines) == 1 and result.metrics["fidelity"] == 1
        for key in METRIC_KEYS + TEST_METRIC_KEYS:
            assert result.metrics[key] == pytest.approx(lines[0][key])
        ds = json.loads((trial / "ds_config.json").read_text())
        assert ds["train_batch_size"] == 64
        assert ds["train_micro_batch_size_per_gpu"] == 64 // workers
        # Validation metrics summed over the workers' shards equal a one-process evaluation
        # of the consolidated weights.
        again = evaluate_saved_weights(trial, training)
        assert again.acc1 == pytest.approx(lines[0]["val_acc"], abs=1.5 / 359)
        assert again.loss == pytest.approx(lines[0]["val_loss"], rel=1e-4)
    shards = json.loads((tmp_path / "w2" / "checkpoint" / "state.json").read_text())["shards"]
    # 1,079 training images in two padded halves; 359 validation images split 180 / 179.
    assert shards == [{"rank": r, "train_images": 540, "steps_per_epoch": 540 // 32,
                       "val_images": 180 - r} for r in range(2)]


def _ray_train_worker_pids() -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::RayTrainWorker"):
            pids.append(proc.pid)
    return pids


def test_killed_ray_train_worker_is_restarted_from_the_checkpoint(ray_local, tmp_path):
    import os
    import signal

    trial = tmp_path / "t"
    training = recipe(epochs=3)
    killed = []

    def kill_one_worker_after_first_epoch(metrics):
        if metrics["epoch"] == 1 and not killed:
            pids = _ray_train_worker_pids()
            assert len(pids) == 2
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    out = run_candidate(SPEC, training, trial, workers=2, cpus_per_worker=0.5, max_failures=1,
                        on_epoch=kill_one_worker_after_first_epoch)
    assert killed and out["epoch"] == 3
    lines = read_lines(trial)
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    # Epoch 3 was trained by the restarted worker group, which started later.
    assert lines[2]["startup_s"] > lines[0]["startup_s"] + 1
    state = json.loads((trial / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 3 and state["world_size"] == 2
    assert not (trial / "failure.json").exists()
    again = evaluate_saved_weights(trial, training)
    assert again.acc1 == pytest.approx(lines[-1]["val_acc"], abs=1.5 / 359)


def test_impulse_candidates_record_the_attention_mass_their_init_reached(tmp_path):
    from launch.worker import INIT_METRIC_KEYS
    from spvit.init import attention_mass_metrics

    spec = SPEC.replace(init="impulse3", pos_embed="learned_sincos")
    run_candidate(spec, recipe(), tmp_path / "t")
    (line,) = read_lines(tmp_path / "t")
    expected = attention_mass_metrics(create_model(spec, seed=0))
    assert set(INIT_METRIC_KEYS) <= set(line)
    for key in INIT_METRIC_KEYS:
        assert line[key] == pytest.approx(expected[key], abs=1e-6)
    assert 0.0 < line["init_mass_min"] <= line["init_mass_mean"] <= 1.0
