"""The checkpointed-epoch harness shared by trials and the supernet trainer: each worker's engine
on its own GPU, and bf16 refused where the device has none, for both kinds of run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from launch.harness import WorkerSetup
from launch.supernet import ray_supernet_loop, train_supernet_worker
from launch.worker import ray_train_loop, train_worker
from search_spaces.space import SearchSpace
from search_spaces.training import TrainingConfig
from spvit.arch import ArchSpec
from spvit.errors import ConfigError
from spvit.supernet import SPViTSupernet
from tests.tiny_space import tiny_space

SPEC = ArchSpec.uniform(depth=1, heads=2, embed_dim=16, img_size=16, patch_size=4, in_chans=1,
                        num_classes=10, head="avg")


class EngineBuilt(Exception):
    """Raised by the mocked `deepspeed.initialize`: the test stops where the engine is placed."""


def _trial_config(tmp_path, rank):
    training = TrainingConfig(epochs=1, batch_size=64, dataset="digits")
    return ray_train_loop, {"arch": SPEC.to_flat(), "training": training.to_dict(),
                            "trial_dir": str(tmp_path / f"trial_{rank}"), "resume": False}


def _supernet_config(tmp_path, rank):
    out = tmp_path / f"supernet_{rank}"
    out.mkdir()
    return ray_supernet_loop, {"space": SearchSpace.from_dict(tiny_space()).to_dict(),
                               "out": str(out), "resume": False, "random_subnets": 2}


@pytest.mark.parametrize("kind", ["trial", "supernet"])
def test_two_workers_on_two_gpus_pin_each_engine_to_its_own_device(tmp_path, monkeypatch, kind):
    """Ray Train gives worker r of 2 the GPU `cuda:r`; DeepSpeed must be told that device (its
    default, `cuda:$LOCAL_RANK`, need not be it), and torch's current device set to it."""
    import deepspeed
    import ray.train
    import ray.train.torch

    placed, current = [], []

    def initialize(*, args=None, model=None, **kwargs):
        placed.append((args, model))
        raise EngineBuilt

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    # Two workers without a two-process group: the harness's collectives before the engine.
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)

    def all_gather_object(out, obj, *a, **k):
        out[:] = [obj] * len(out)

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    for rank in (0, 1):
        # Ray Train's view of worker `rank` on a 2-GPU node: both see both GPUs, each its own.
        context = SimpleNamespace(get_world_rank=lambda r=rank: r, get_world_size=lambda: 2,
                                  get_local_rank=lambda r=rank: r)
        monkeypatch.setattr(ray.train, "get_context", lambda c=context: c)
        monkeypatch.setattr(ray.train.torch, "get_device",
                            lambda r=rank: torch.device("cuda", r))
        loop, config = (_trial_config if kind == "trial" else _supernet_config)(tmp_path, rank)
        with pytest.raises(EngineBuilt):
            loop(config)
    assert [args.device_rank for args, _ in placed] == [0, 1]
    assert current == [torch.device("cuda", 0), torch.device("cuda", 1)]
    models = [model for _, model in placed]
    assert all(isinstance(m, SPViTSupernet) for m in models) == (kind == "supernet")


@pytest.mark.parametrize("kind", ["trial", "supernet"])
def test_bf16_on_a_gpu_without_bf16_is_refused_before_training(tmp_path, monkeypatch, kind):
    import deepspeed

    def initialize(**kwargs):
        raise AssertionError("no engine may be built for a recipe the device cannot compute")

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    setup = WorkerSetup(device="cuda:0")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="Tesla V100 has none. Set training.bf16: false"):
        if kind == "trial":
            train_worker(SPEC, TrainingConfig(epochs=1, batch_size=64, bf16=True), out,
                         setup=setup, resume=False)
        else:
            space = SearchSpace.from_dict(tiny_space(bf16=True))
            train_supernet_worker(space, out, setup=setup)
    assert not out.exists()  # refused before the folder was touched
