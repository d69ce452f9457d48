"""`spvit-nas supernet train|score`: training with the sandwich rule, resume, bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file

from launch.cli import main
from launch.supernet import train_supernet
from nas.oneshot import SandwichSampler, open_supernet
from search_spaces.space import SearchSpace
from spvit.arch import ArchSpec, BlockSpec
from tests.tiny_space import TINY


def _space_file(tmp_path, name="tiny.yaml", **changes):
    data = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        data["dimensions"][key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _small_arch(tmp_path, **changes):
    spec = ArchSpec(blocks=(BlockSpec(heads=changes.pop("heads", 1), prior="mlp"),),
                    img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=16,
                    mlp_ratio=1.0, stem="linear", head="avg", pool_width_factor=2, **changes)
    path = tmp_path / "arch.yaml"
    spec.save(path)
    return path


@pytest.mark.slow
def test_train_resume_continues_with_optimizer_state_and_score(tmp_path, capsys):
    space = _space_file(tmp_path)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["supernet", "train", "--space", str(space), "--out", str(whole)]) == 0

    class Stop(Exception):
        pass

    def stop_after_first(line):
        raise Stop  # the process dies after epoch 1's checkpoint

    with pytest.raises(Stop):
        train_supernet(SearchSpace.load(space), parts, on_epoch=stop_after_first)
    state = json.loads((parts / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1
    assert main(["supernet", "train", "--space", str(space), "--out", str(parts),
                 "--resume"]) == 0
    lines = [json.loads(s) for s in (parts / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for key in ("val_acc_largest", "val_acc_smallest", "train_loss", "lr"):
        assert all(isinstance(m[key], float) for m in lines), key
    # Interrupted after epoch 1 and resumed == trained in one go: Adam's moments and the
    # schedule's position came back from the checkpoint (a fresh optimizer would differ).
    a, b = load_file(whole / "supernet.safetensors"), load_file(parts / "supernet.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    whole_lines = [json.loads(s) for s in (whole / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["lr"] == pytest.approx(whole_lines[-1]["lr"])
    assert lines[-1]["train_loss"] == pytest.approx(whole_lines[-1]["train_loss"], rel=1e-5)
    capsys.readouterr()

    # the folder refuses a second training without --resume, in one line
    assert main(["supernet", "train", "--space", str(space), "--out", str(parts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a supernet checkpoint" in err[0]

    # score: inherited-weight accuracy as JSON, equal to the extracted stand-alone model's
    arch = _small_arch(tmp_path)
    assert main(["supernet", "score", "--supernet", str(parts), "--arch", str(arch),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["val_acc"] <= 1.0 and result["supernet_epochs"] == 2
    folder = open_supernet(parts)
    from nas.engine import evaluate
    from nas.oneshot import validation_loader

    model = folder.net.subnet(ArchSpec.load(arch)).eval()
    stats = evaluate(model, validation_loader(folder.space), device=torch.device("cpu"))
    assert stats.acc1 == pytest.approx(result["val_acc"])
    # --finetune-steps: a fine-tuned copy is scored; the supernet's weights file is untouched
    weights = (parts / "supernet.safetensors").read_bytes()
    assert main(["supernet", "score", "--supernet", str(parts), "--arch", str(arch),
                 "--finetune-steps", "3", "--json"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["finetune_steps"] == 3 and 0.0 <= tuned["val_acc"] <= 1.0
    assert tuned["val_acc"] != result["val_acc"]
    assert (parts / "supernet.safetensors").read_bytes() == weights
    assert main(["supernet", "score", "--supernet", str(parts), "--arch", str(arch),
                 "--finetune-steps", "-2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--finetune-steps must be an integer >= 0, but got -2" in err[0]

    # an architecture outside the space: exit 2, one line naming the dimension and value
    bad = _small_arch(tmp_path, heads=4)
    assert main(["supernet", "score", "--supernet", str(parts), "--arch", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "heads_0 4 is not among" in err[0]

    # a supernet from another space cannot serve a search over this one
    other = SearchSpace.load(_space_file(tmp_path, "other.yaml", embed_dim=[16, 24]))
    with pytest.raises(Exception, match=r"dimensions.embed_dim \[16, 32\].*has \[16, 24\]"):
        folder.check_space(other)


def test_score_missing_or_untrained_folder_exits_2_with_one_line(tmp_path, capsys):
    arch = _small_arch(tmp_path)
    assert main(["supernet", "score", "--supernet", str(tmp_path / "nope"), "--arch",
                 str(arch)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["supernet", "score", "--supernet", str(tmp_path / "empty"), "--arch",
                 str(arch)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a supernet folder" in err[0]


def test_train_refuses_zero3_and_too_few_random_subnets(tmp_path, capsys):
    data = json.loads(json.dumps(TINY))
    data["training"]["zero_stage"] = 3
    space = tmp_path / "z3.yaml"
    space.write_text(yaml.safe_dump(data))
    assert main(["supernet", "train", "--space", str(space), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zero_stage 3" in err[0]
    assert main(["supernet", "train", "--space", str(_space_file(tmp_path)), "--out",
                 str(tmp_path / "o"), "--random-subnets", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 2 random subnets" in err[0]
    assert main(["supernet", "train", "--space", str(_space_file(tmp_path)), "--out",
                 str(tmp_path / "o"), "--label-epochs", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--label-epochs must be an integer >= 0" in err[0]


def test_train_subset_flag_sets_the_recipe_and_refuses_bad_values(tmp_path, capsys):
    data = json.loads(json.dumps(TINY))
    data["training"]["train_subset"] = 600
    space = tmp_path / "subset.yaml"
    space.write_text(yaml.safe_dump(data))
    out = tmp_path / "all"
    assert main(["supernet", "train", "--space", str(space), "--out", str(out), "--epochs", "1",
                 "--train-subset", "all"]) == 0
    assert SearchSpace.load(out / "space.yaml").training.train_subset is None
    out = tmp_path / "some"
    assert main(["supernet", "train", "--space", str(space), "--out", str(out), "--epochs", "1",
                 "--train-subset", "300"]) == 0
    assert SearchSpace.load(out / "space.yaml").training.train_subset == 300
    capsys.readouterr()
    for bad, says in (("many", "--train-subset must be a number of images or 'all'"),
                      ("5", "training.train_subset must be an integer >= 10")):
        assert main(["supernet", "train", "--space", str(space), "--out", str(tmp_path / bad),
                     "--train-subset", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
        assert not (tmp_path / bad).exists()


@pytest.mark.parametrize("name", ["digits", "cifar", "imagenet"])
def test_every_sampled_training_subnet_is_feasible(name):
    space = SearchSpace.load(f"search_spaces/{name}.yaml")
    sampler = SandwichSampler(space, seed=0, random_subnets=2)
    largest_cost = space.constraints.values(sampler.largest)
    seen = set()
    for step in range(1, 26):
        subnets = sampler.step(epoch=1 + step % 3, step=step)
        assert len(subnets) == 4
        assert subnets[0].depth == sampler.largest.depth
        assert subnets[1].embed_dim == sampler.smallest.embed_dim
        for spec in subnets:
            assert space.contains(spec), space.why_not(spec)
            assert not space.constraints.violations(spec), spec.to_flat()
            seen.add(json.dumps(spec.to_flat(), sort_keys=True))
    assert len(seen) > 25  # random subnets and redrawn priors vary
    # the same (epoch, step) gives the same subnets: data-parallel workers agree
    assert sampler.step(2, 7) == SandwichSampler(space, seed=0).step(2, 7)
    assert largest_cost  # the space has constraints to meet
    # the largest is at least as costly as any random feasible member
    from spvit.cost import estimate

    rng = random.Random(1)
    big = estimate(sampler.largest).gflops
    assert all(estimate(space.sample_feasible(rng).spec).gflops <= big * 1.05
               for _ in range(20))


@pytest.mark.slow
def test_two_workers_shard_the_data(tmp_path, ray_local, capsys):
    data = json.loads(json.dumps(TINY))
    data["training"]["epochs"] = 1
    space = tmp_path / "one.yaml"
    space.write_text(yaml.safe_dump(data))
    out = tmp_path / "two"
    assert main(["supernet", "train", "--space", str(space), "--out", str(out),
                 "--workers", "2"]) == 0
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["world_size"] == 2 and state["epoch"] == 1
    shards = sorted(state["shards"], key=lambda s: s["rank"])
    assert [s["rank"] for s in shards] == [0, 1]
    train = [s["train_images"] for s in shards]
    # DistributedSampler: equal halves (padded by at most one image) of the 1079 training images
    assert train[0] == train[1] and 2 * train[0] - 1079 in (0, 1)
    assert sum(s["val_images"] for s in shards) == 359  # every validation image exactly once
    assert shards[0]["steps_per_epoch"] == shards[1]["steps_per_epoch"] >= 1
    assert (out / "supernet.safetensors").is_file()
