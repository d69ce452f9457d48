"""Zero-cost proxies: scores of an untrained architecture from at most one batch.

A ranking from a trained supernet is only worth its cost if it beats what is free: the cost
model's parameter and FLOP counts (`spvit.cost.estimate`) and proxies computed at
initialisation, as compared by Abdelfattah et al. 2021 ("Zero-Cost Proxies for Lightweight
NAS"). This module computes two of them for an SP-ViT built from an `ArchSpec`:

* `synflow` (Tanaka et al. 2020): with every parameter replaced by its absolute value and an
  all-ones input, R = sum of the network's outputs; the score is sum |theta * dR/dtheta| over
  the weights of the Linear and Conv2d layers. Computed in float64 on a copy of the model in
  eval mode (no dropout or drop-path draws). As in the zero-cost-proxy reference code, which
  scores networks without their BatchNorm layers, normalisation layers (LayerNorm included)
  are bypassed: a norm divides by the activations' own scale, so with it the score would no
  longer be the sum over input-output paths of the products of |theta| that synflow measures
  (scaling a weight before a norm would not change it).
* `naswot` (Mellor et al. 2021): for one batch of N images, each image's binary code is the
  sign pattern (x > 0) of the inputs to the MLP activations (GELU / ReLU) of every block, over
  all tokens; K_H[i, j] = number of units on which images i and j agree; the score is
  log |det K_H|.

Both are deterministic for a given model and batch and leave the model's weights and mode as
they were. `ZeroCostScorer` builds each candidate with `spvit.create_model(spec, seed=seed)`
(the spec's own init scheme, one seed for all) and scores it on one fixed batch. Pure torch:
the scores are what `bench/supernet_rank.py` reports beside the supernet's ranking.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from spvit.arch import ArchSpec

# Normalisation layers bypassed by `synflow`.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
# Layers whose weights `synflow` sums over (those of the reference code).
SYNFLOW_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


def _identity(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


def synflow(model: nn.Module, input_shape: Sequence[int]) -> float:
    """The synflow score of `model` for one input of shape `input_shape` (no batch axis).

    Works on a float64 copy in eval mode with |theta| for every parameter and the
    normalisation layers (`NORM_TYPES`) bypassed; `model` is not changed.
    """
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    for m in net.modules():
        if isinstance(m, NORM_TYPES):
            m.forward = _identity  # type: ignore[method-assign]
    net.zero_grad(set_to_none=True)
    ones = torch.ones((1, *input_shape), dtype=torch.float64)
    net(ones).sum().backward()
    total = 0.0
    for m in net.modules():
        if isinstance(m, SYNFLOW_LAYERS) and m.weight.grad is not None:
            total += float((m.weight * m.weight.grad).detach().abs().sum())
    return total


def mlp_activations(model: nn.Module) -> list[nn.Module]:
    """The activation module of every timm `Mlp` in `model` (the blocks' GELU / ReLU)."""
    from timm.layers import Mlp

    return [m.act for m in model.modules() if isinstance(m, Mlp)]


def naswot(model: nn.Module, images: torch.Tensor, *,
           activations: Iterable[nn.Module] | None = None) -> float:
    """log |det K_H| of the binary codes of `images` at the inputs of `activations`.

    Args:
        model: evaluated in eval mode without gradients; its mode is restored afterwards.
        images: one batch `(N, C, H, W)`.
        activations: the modules whose inputs are coded (default: `mlp_activations(model)`).

    Returns -inf when K_H is singular (two images with the same code).
    """
    acts = list(mlp_activations(model) if activations is None else activations)
    if not acts:
        raise ValueError(f"NASWOT codes the inputs of activation layers, but"
                         f" {type(model).__name__} has none to hook. Pass activations=[...].")
    n = images.shape[0]
    kernel = torch.zeros(n, n, dtype=torch.float64)

    def code(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        c = (inputs[0].detach().reshape(n, -1) > 0).double()  # (N, units)
        kernel.add_(c @ c.T).add_((1.0 - c) @ (1.0 - c).T)

    handles = [m.register_forward_pre_hook(code) for m in acts]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    sign, logdet = torch.linalg.slogdet(kernel)
    return float(logdet) if sign > 0 else -math.inf


class ZeroCostScorer:
    """synflow and NASWOT of candidates at initialisation, on one fixed batch.

    Args:
        images: the batch NASWOT codes `(N, C, H, W)`.
        seed: every candidate is built with `spvit.create_model(spec, seed=seed)`.
    """

    def __init__(self, images: torch.Tensor, *, seed: int = 0) -> None:
        self.images = images
        self.seed = seed

    @classmethod
    def for_space(cls, space: Any, *, batch_size: int = 128, seed: int | None = None
                  ) -> ZeroCostScorer:
        """The first `batch_size` images of the space's first training batches
        (`nas.oneshot.finetune_batches`: epoch 0's shuffle and augmentation); `seed` defaults
        to the recipe's."""
        from .oneshot import finetune_batches

        batches = finetune_batches(space, math.ceil(batch_size / space.training.batch_size))
        images = torch.cat([b[0] for b in batches])[:batch_size].float()
        return cls(images, seed=space.training.seed if seed is None else seed)

    def __call__(self, spec: ArchSpec) -> dict[str, float]:
        from spvit.factory import create_model

        model = create_model(spec, seed=self.seed)
        start = time.perf_counter()
        score_synflow = synflow(model, (spec.in_chans, spec.img_size, spec.img_size))
        synflow_s = time.perf_counter() - start
        start = time.perf_counter()
        score_naswot = naswot(model, self.images)
        return {"synflow": score_synflow, "synflow_s": synflow_s,
                "naswot": score_naswot, "naswot_s": time.perf_counter() - start}
