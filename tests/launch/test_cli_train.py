"""`spvit-nas train` end to end: a tiny architecture on digits, refusal to overwrite, resume."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file

from launch.cli import main
from launch.cmd_train import load_training
from search_spaces.training import TrainingConfig
from spvit import create_model
from spvit.arch import ArchSpec
from spvit.errors import ConfigError

SPEC = ArchSpec.uniform(depth=2, heads=2, embed_dim=32, img_size=16, patch_size=2, in_chans=1,
                        num_classes=10, head="avg")


@pytest.fixture
def files(tmp_path):
    arch = tmp_path / "arch.yaml"
    SPEC.save(arch)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "name": "tiny", "arch": {"img_size": 16},
        "training": {"dataset": "digits", "epochs": 3, "batch_size": 64, "lr": 0.002},
    }))
    return arch, space


@pytest.mark.slow
def test_train_cli_end_to_end_refuses_overwrite_and_resumes(files, tmp_path, capsys):
    arch, space = files
    out = tmp_path / "run"
    argv = ["train", "--arch", str(arch), "--out", str(out), "--training", str(space)]
    assert main(argv + ["--epochs", "1"]) == 0
    printed = capsys.readouterr()
    assert "epoch 1/1, val_acc" in printed.out
    for name in ("metrics.jsonl", "model.safetensors", "arch.yaml", "ds_config.json",
                 "training.yaml", "checkpoint/state.json"):
        assert (out / name).is_file(), name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1]
    saved = yaml.safe_load((out / "training.yaml").read_text())
    assert saved["epochs"] == 1 and saved["batch_size"] == 64  # the space's block, overridden
    model = create_model(ArchSpec.load(out / "arch.yaml"))
    model.load_state_dict(load_file(out / "model.safetensors"))  # complete, strict

    # The folder holds a checkpoint: without --resume it is refused in one line.
    assert main(argv + ["--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"spvit-nas train: error: --out {out} already holds a checkpoint (epoch 1)."
                   " Pass --resume to continue it, or choose another --out.")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

    # --resume continues from epoch 1 to the new budget.
    assert main(argv + ["--epochs", "2", "--resume"]) == 0
    assert "epoch 2/2" in capsys.readouterr().out
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]


def test_bad_flags_exit_2_with_one_line(files, tmp_path, capsys):
    arch, space = files
    out = str(tmp_path / "run")
    assert main(["train", "--arch", str(arch), "--out", out, "--training", str(space),
                 "--workers", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not divisible by workers_per_trial 3" in err
    assert main(["train", "--arch", str(arch), "--out", out, "--dataset", "digts"]) == 2
    assert "Did you mean 'digits'?" in capsys.readouterr().err
    bad_arch = SPEC.replace(num_classes=7)
    bad_arch.save(tmp_path / "bad.yaml")
    assert main(["train", "--arch", str(tmp_path / "bad.yaml"), "--out", out]) == 2
    assert "Set num_classes: 10" in capsys.readouterr().err
    assert not (tmp_path / "run" / "failure.json").exists()


def test_load_training_reads_recipes_and_space_blocks(files, tmp_path):
    _, space = files
    assert load_training(str(space)) == TrainingConfig(epochs=3, batch_size=64, lr=0.002)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 4\nzero_stage: 2\n")
    assert load_training(str(recipe)) == TrainingConfig(epochs=4, zero_stage=2)
    assert load_training(None) == TrainingConfig()
    recipe.write_text("epoch: 4\n")
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        load_training(str(recipe))
    recipe.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of training fields"):
        load_training(str(recipe))
    with pytest.raises(ConfigError, match="does not exist"):
        load_training(str(tmp_path / "missing.yaml"))
