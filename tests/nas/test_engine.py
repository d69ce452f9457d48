"""Training engine and DeepSpeed config: losses and accuracies against plain references."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from nas.ds_config import build_ds_config, deepspeed_device_args, micro_batch_size, write_ds_config
from nas.engine import (
    TorchEngine,
    TrainingDiverged,
    evaluate,
    inprocess_device,
    model_input_dtype,
    process_group_backend,
    topk_correct,
    train_one_epoch,
)
from search_spaces.training import TrainingConfig
from spvit.errors import ConfigError
from tests.messages import assert_names_value_and_fix


class PlainEngine:
    """The DeepSpeed-engine methods the loop uses, over a torch optimizer (records calls)."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=lr)
        self.backwards = 0
        self.steps = 0

    def __call__(self, x):
        return self.model(x)

    def backward(self, loss):
        self.backwards += 1
        loss.backward()

    def step(self):
        self.steps += 1
        self.opt.step()
        self.opt.zero_grad()

    def train(self, mode=True):
        self.model.train(mode)

    def get_lr(self):
        return [self.opt.param_groups[0]["lr"]]


def batches(n_batches=4, batch=5, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n_batches)]


def smoothed_ce_reference(logits: torch.Tensor, target: torch.Tensor, eps: float) -> float:
    """Mean over rows of (1 - eps) * NLL(target) + eps * mean_k NLL(k), written out."""
    total = 0.0
    for row, t in zip(logits.tolist(), target.tolist(), strict=True):
        m = max(row)
        log_z = m + math.log(sum(math.exp(v - m) for v in row))
        nll = [log_z - v for v in row]
        total += (1 - eps) * nll[t] + eps * sum(nll) / len(row)
    return total / len(target)


def test_train_one_epoch_loss_matches_reference_with_label_smoothing():
    torch.manual_seed(0)
    model = nn.Linear(3, 7)
    data = batches()
    engine = PlainEngine(model, lr=0.0)  # frozen weights: the epoch loss is a fixed number
    stats = train_one_epoch(engine, data, epoch=1, device=torch.device("cpu"),
                            label_smoothing=0.2)
    with torch.no_grad():
        x = torch.cat([b[0] for b in data])
        y = torch.cat([b[1] for b in data])
        ref = smoothed_ce_reference(model(x), y, 0.2)
    assert stats.loss == pytest.approx(ref, rel=1e-6)
    assert (stats.images, stats.steps, engine.backwards, engine.steps) == (20, 4, 4, 4)
    assert stats.images_per_s > 0 and stats.lr == 0.0


def test_training_reduces_the_loss_and_calls_on_step():
    torch.manual_seed(0)
    model = nn.Linear(3, 7)
    data = batches(n_batches=8)
    engine = PlainEngine(model, lr=0.5)
    seen = []
    first = train_one_epoch(engine, data, epoch=1, device=torch.device("cpu"),
                            on_step=lambda step, loss: seen.append(step))
    for epoch in range(2, 6):
        last = train_one_epoch(engine, data, epoch=epoch, device=torch.device("cpu"))
    assert seen == list(range(1, 9))
    assert last.loss < first.loss


def test_nan_loss_stops_before_backward_with_the_place_and_the_fix():
    class NanAtThirdBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 7)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            out = self.lin(x)
            return out * float("nan") if self.calls == 3 else out

    engine = PlainEngine(NanAtThirdBatch(), lr=0.1)
    with pytest.raises(TrainingDiverged) as e:
        train_one_epoch(engine, batches(), epoch=2, device=torch.device("cpu"))
    assert e.value.reason == ("loss became nan at epoch 2 step 3; lower training.lr or enable"
                              " grad_clip (training.grad_clip > 0)")
    assert engine.backwards == 2  # the bad step never reached backward/step

    class Inf(nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 7)
            out[:, 0] = float("inf")
            return out + x.sum() * 0

    with pytest.raises(TrainingDiverged, match="loss became"):
        train_one_epoch(PlainEngine(nn.Sequential(nn.Linear(3, 3), Inf()), lr=0.1), batches(),
                        epoch=1, device=torch.device("cpu"))


def test_topk_correct_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 6, generator=g)
    target = torch.randint(0, 6, (50,), generator=g)
    target[:3] = -1
    got = topk_correct(logits, target, (1, 2, 5, 9))
    for k, n in zip((1, 2, 5, 9), got, strict=True):
        ref = 0
        for row, t in zip(logits.tolist(), target.tolist(), strict=True):
            order = sorted(range(6), key=lambda j: -row[j])
            ref += t >= 0 and t in order[:min(k, 6)]
        assert n == ref


def test_evaluate_ignores_padding_and_matches_reference():
    torch.manual_seed(0)
    model = nn.Linear(3, 7)
    data = batches(n_batches=3, batch=6)
    x, y = data[2]
    y = y.clone()
    y[-2:] = -1  # two padding rows
    data[2] = (x, y)
    stats = evaluate(model, data, device=torch.device("cpu"))
    with torch.no_grad():
        xs = torch.cat([b[0] for b in data])
        ys = torch.cat([b[1] for b in data])
        keep = ys >= 0
        logits = model(xs)[keep]
        ys = ys[keep]
    ref_loss = smoothed_ce_reference(logits, ys, 0.0)
    ref_acc = sum(int(r.argmax()) == t for r, t in zip(logits, ys.tolist(), strict=True)) / len(ys)
    assert stats.count == 16
    assert stats.loss == pytest.approx(ref_loss, rel=1e-6)
    assert stats.acc1 == pytest.approx(ref_acc)
    assert stats.acc1 <= stats.acc5 <= 1.0


# --------------------------------------------------------------------------- DeepSpeed config
def test_ds_config_keeps_the_global_batch_over_workers_and_accumulation(tmp_path):
    training = TrainingConfig(batch_size=64, epochs=3, lr=1e-3, min_lr=1e-5, warmup_epochs=0.5,
                              weight_decay=0.05, grad_clip=1.0, zero_stage=2, bf16=True)
    for world, accum in ((1, 1), (2, 1), (2, 2), (4, 4)):
        cfg = build_ds_config(training, world_size=world, steps_per_epoch=10,
                              gradient_accumulation=accum)
        assert cfg["train_batch_size"] == 64
        assert cfg["train_micro_batch_size_per_gpu"] * accum * world == 64
        assert cfg["gradient_accumulation_steps"] == accum
    cfg = build_ds_config(training, world_size=2, steps_per_epoch=10)
    sched = cfg["scheduler"]["params"]
    assert (sched["total_num_steps"], sched["warmup_num_steps"]) == (30, 5)
    assert sched["warmup_min_ratio"] == sched["cos_min_ratio"] == pytest.approx(0.01)
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    assert cfg["optimizer"]["params"]["weight_decay"] == 0.05
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["bf16"]["enabled"] is True
    path = write_ds_config(cfg, tmp_path / "ds_config.json")
    assert json.loads(path.read_text()) == cfg


def test_ds_config_without_warmup_is_flat_and_bad_batches_are_refused():
    cfg = build_ds_config(TrainingConfig(warmup_epochs=0), world_size=1, steps_per_epoch=5)
    assert cfg["scheduler"]["params"]["warmup_min_ratio"] == 1.0
    with pytest.raises(ConfigError, match="multiple of 6") as e:
        micro_batch_size(TrainingConfig(batch_size=64), 3, 2)
    assert_names_value_and_fix(str(e.value), "64", "3")
    with pytest.raises(ConfigError, match="at least one optimizer step"):
        build_ds_config(TrainingConfig(), world_size=1, steps_per_epoch=0)


def test_ds_config_precision_block_follows_the_recipe_only():
    for bf16 in (True, False):
        cfg = build_ds_config(TrainingConfig(bf16=bf16), world_size=1, steps_per_epoch=5)
        assert cfg["bf16"] == {"enabled": bf16} and cfg["fp16"] == {"enabled": False}
        # No device, GPU index or memory size in the recipe: it runs as-is on CPU or GPU.
        assert "cuda" not in json.dumps(cfg) and "offload" not in json.dumps(cfg)


# --------------------------------------------------------------------------- placement
def test_process_group_backend_is_nccl_on_gpus_and_gloo_on_cpus():
    assert process_group_backend(True) == "nccl"
    assert process_group_backend(False) == "gloo"


def test_inprocess_device_is_the_first_visible_gpu_or_cpu(monkeypatch):
    assert inprocess_device(False) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="torch sees no CUDA device") as e:
        inprocess_device(True)
    assert_names_value_and_fix(str(e.value), "Train on CPU (no GPU per worker)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    with pytest.raises(ConfigError, match="nccl backend"):
        inprocess_device(True)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    assert inprocess_device(True) == torch.device("cuda", 0)


def test_model_input_dtype_and_bf16_support(monkeypatch):
    assert model_input_dtype(False, "cpu") is torch.float32
    assert model_input_dtype(True, "cpu") is torch.bfloat16
    assert model_input_dtype(False, "cuda:0") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert model_input_dtype(True, "cuda:0") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ConfigError, match="Tesla V100 has none. Set training.bf16: false"):
        model_input_dtype(True, "cuda:0")


def test_deepspeed_device_args_pin_the_engine_to_the_worker_gpu(monkeypatch):
    assert deepspeed_device_args("cpu") is None
    assert deepspeed_device_args(torch.device("cuda", 1)).device_rank == 1
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert deepspeed_device_args("cuda").device_rank == 3
    # DeepSpeed checks `args.local_rank` against $LOCAL_RANK; the namespace must not carry one.
    assert not hasattr(deepspeed_device_args("cuda:0"), "local_rank")


def test_module_has_no_deepspeed_or_ray_import():
    import nas.data
    import nas.ds_config
    import nas.engine

    for module in (nas.data, nas.ds_config, nas.engine):
        source = open(module.__file__, encoding="utf-8").read()
        assert "import deepspeed" not in source and "import ray" not in source


def test_torch_engine_clips_steps_schedules_and_clears_like_a_plain_loop():
    """`train_one_epoch` over a `TorchEngine` equals a hand-written loop with the same clip,
    optimizer and schedule (independent of the engine's code)."""
    torch.manual_seed(0)
    data = [(torch.randn(8, 5) * 50, torch.randint(0, 3, (8,))) for _ in range(4)]

    def fresh():
        torch.manual_seed(1)
        model = torch.nn.Linear(5, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
        return model, opt, sched

    model, opt, sched = fresh()
    engine = TorchEngine(model, opt, sched, grad_clip=0.1)
    stats = train_one_epoch(engine, data, epoch=1, device=torch.device("cpu"))

    ref, ref_opt, ref_sched = fresh()
    losses = []
    for x, y in data:
        loss = torch.nn.functional.cross_entropy(ref(x), y)
        losses.append(loss.item())
        ref_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        ref_opt.step()
        ref_sched.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert all(p.grad is None for p in model.parameters())  # cleared after each step
    assert stats.steps == 4 and stats.images == 32
    assert stats.loss == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert stats.lr == pytest.approx(0.5 / 5) == engine.get_lr()[0]
