"""Scoring a subnet with the supernet's weights.

`InheritedScorer` gives a subnet's validation accuracy with inherited weights (evaluation only),
or after a few fine-tuning steps of a stand-alone copy (`finetune_steps`), which ranks
candidates better at a cost of seconds per candidate (docs/BENCHMARKS.md).
`finetune_batches` and `validation_loader` are the data it uses, as the space's trials see it.
Part of `nas.oneshot`; no Ray.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Sequence
from typing import Any

from search_spaces.space import SearchSpace
from spvit.arch import ArchSpec
from spvit.errors import ConfigError
from spvit.supernet import SPViTSupernet

from .checks import whole_setting


def check_finetune_steps(steps: Any) -> int:
    """`steps` if it is a valid number of fine-tuning steps (an integer >= 0), else
    `SettingError` naming `oneshot.finetune_steps`, the value and the fix."""
    return whole_setting("oneshot.finetune_steps", steps, 0,
                         "Use 0 (inherited weights as they are) or e.g. 20.")


class InheritedScorer:
    """Validation accuracy of a subnet with the supernet's weights.

    With `finetune_steps=0` (the default) this is evaluation only: the supernet computes the
    active subnet. With `finetune_steps=N` a stand-alone copy of the subnet
    (`SPViTSupernet.subnet`, the inherited weights) first takes N AdamW steps on
    `train_batches` (cycled; every candidate sees the same batches in the same order, with the
    same dropout draws), the learning rate `lr` decaying to zero on a cosine, and the copy is
    evaluated; the supernet itself is never changed. The score is deterministic either way.

    Args:
        net: the supernet (eval mode is set on each call).
        loader: validation batches `(images, labels)`.
        device: where the batches go.
        finetune_steps: optimizer steps before evaluation (>= 0).
        train_batches: the `(images, labels)` batches of those steps (`finetune_batches`).
        lr: peak learning rate of those steps.
        weight_decay: AdamW weight decay of those steps.
        seed: seed of the dropout / drop-path draws of those steps.
    """

    def __init__(self, net: SPViTSupernet, loader: Any, *, device: str = "cpu",
                 finetune_steps: int = 0, train_batches: Sequence[Any] = (),
                 lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0) -> None:
        check_finetune_steps(finetune_steps)
        if finetune_steps and not train_batches:
            raise ConfigError("fine-tuning before scoring needs training batches, but none"
                              " were given. Pass train_batches=finetune_batches(space, steps).")
        self.net = net
        self.loader = loader
        self.device = device
        self.finetune_steps = finetune_steps
        self.train_batches = list(train_batches)
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed

    @classmethod
    def for_space(cls, net: SPViTSupernet, space: SearchSpace, *, device: str = "cpu",
                  finetune_steps: int = 0, lr: float | None = None) -> InheritedScorer:
        """The scorer of `space`'s candidates: its validation split and, when fine-tuning, its
        first training batches and its recipe's weight decay and learning rate (or `lr`)."""
        t = space.training
        batches = finetune_batches(space, finetune_steps) if finetune_steps > 0 else ()
        return cls(net, validation_loader(space), device=device, finetune_steps=finetune_steps,
                   train_batches=batches, lr=t.lr if lr is None else lr,
                   weight_decay=t.weight_decay, seed=t.seed)

    def _finetuned(self, spec: ArchSpec) -> Any:
        import torch
        from timm.optim import param_groups_weight_decay

        from ..engine import TorchEngine, train_one_epoch

        device = torch.device(self.device)
        model = self.net.subnet(spec).to(device)
        # the trials' rule: no decay on norms, biases, embeddings and priors
        groups = param_groups_weight_decay(model, self.weight_decay,
                                           no_weight_decay_list=model.no_weight_decay())
        opt = torch.optim.AdamW(groups, lr=self.lr)
        steps = self.finetune_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * i / steps)))
        batches = (self.train_batches[i % len(self.train_batches)] for i in range(steps))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            # the trials' epoch step, over `steps` batches
            train_one_epoch(TorchEngine(model, opt, sched, grad_clip=1.0), batches, epoch=1,
                            device=device)
        return model

    def __call__(self, spec: ArchSpec) -> dict[str, float]:
        import torch

        from ..engine import evaluate

        start = time.perf_counter()
        if self.finetune_steps:
            model: Any = self._finetuned(spec)
        else:
            self.net.set_active(spec)
            model = self.net
        stats = evaluate(model, self.loader, device=torch.device(self.device))
        return {"val_acc": stats.acc1, "val_acc5": stats.acc5, "val_loss": stats.loss,
                "images": stats.count, "finetune_steps": self.finetune_steps,
                "seconds": time.perf_counter() - start}


def finetune_batches(space: SearchSpace, steps: int) -> list[Any]:
    """The first `min(steps, steps per epoch)` training batches of the space's dataset (epoch
    0's shuffle, the recipe's batch size and augmentation, one worker), held in memory."""
    from ..data import build_datasets, build_loaders

    t = space.training
    ref = space.sample_feasible(random.Random(space.search.seed)).spec
    data = build_datasets(t, ref)
    loaders = build_loaders(data, micro_batch_size=min(t.batch_size, len(data.train)),
                            seed=t.seed)
    loaders.set_epoch(0)
    return list(itertools.islice(iter(loaders.train), steps))


def validation_loader(space: SearchSpace, *, batch_size: int = 256) -> Any:
    """The validation split of the space's dataset, as trials see it (one worker)."""
    from ..data import build_datasets, build_loaders

    ref = space.sample_feasible(random.Random(space.search.seed)).spec
    data = build_datasets(space.training, ref)
    micro = min(space.training.batch_size, len(data.train))
    return build_loaders(data, micro_batch_size=micro, eval_batch_size=batch_size).val
