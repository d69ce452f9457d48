"""One sandwich epoch: which subnets learn from what, and the epoch's losses, against a plain
re-computation of the same forward passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nas.oneshot import SandwichSampler, supernet_choices
from nas.sandwich import train_sandwich_epoch
from search_spaces.space import SearchSpace
from spvit.supernet import SPViTSupernet
from tests.tiny_space import tiny_space


class RecordingEngine:
    """The engine shape `train_sandwich_epoch` drives, stepping nothing: weights stay fixed, so
    every loss can be recomputed afterwards."""

    def __init__(self, net: SPViTSupernet) -> None:
        self.module = net
        self.losses: list[float] = []
        self.steps = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def train(self, mode: bool = True) -> None:
        pass  # eval mode: no drop-path draws, so the reference below sees the same outputs

    def backward(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.item())

    def step(self) -> None:
        self.steps += 1

    def get_lr(self) -> list[float]:
        return [0.0]


@pytest.mark.parametrize("distill", [True, False])
def test_largest_learns_from_labels_and_the_others_from_it(distill):
    space = SearchSpace.from_dict(tiny_space())
    sampler = SandwichSampler(space, seed=0, random_subnets=2)
    net = SPViTSupernet(supernet_choices(space), seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 1, 16, 16, generator=gen), torch.randint(0, 10, (6,), generator=gen))
               for _ in range(2)]
    engine = RecordingEngine(net)
    stats = train_sandwich_epoch(engine, batches, sampler, epoch=3, device=torch.device("cpu"),
                                 label_smoothing=0.1, distill=distill)

    expected, largest_sum, others_sum = [], 0.0, 0.0
    with torch.no_grad():
        for step, (images, labels) in enumerate(batches, start=1):
            specs = sampler.step(3, step)
            net.set_active(specs[0])
            teacher_logits = net(images)
            ce = F.cross_entropy(teacher_logits, labels, label_smoothing=0.1).item()
            expected.append(ce)
            largest_sum += ce * len(labels)
            teacher = teacher_logits.softmax(-1)
            for spec in specs[1:]:
                net.set_active(spec)
                logits = net(images)
                if distill:
                    loss = -(teacher * logits.log_softmax(-1)).sum(-1).mean().item()
                else:
                    loss = F.cross_entropy(logits, labels, label_smoothing=0.1).item()
                expected.append(loss)
                others_sum += loss * len(labels) / (sampler.per_step - 1)
    assert engine.losses == pytest.approx(expected, rel=1e-5)
    assert engine.steps == len(batches) * sampler.per_step  # one micro-step per subnet
    assert stats.loss == pytest.approx(largest_sum / 12, rel=1e-5)
    assert stats.distill_loss == pytest.approx(others_sum / 12, rel=1e-5)
    assert stats.images == 12 and stats.subnets_per_step == sampler.per_step
