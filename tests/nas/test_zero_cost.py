"""Zero-cost proxies: synflow and NASWOT against plain references on tiny models."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from nas.zero_cost import ZeroCostScorer, mlp_activations, naswot, synflow
from search_spaces.space import SearchSpace
from spvit import create_model
from tests.tiny_space import tiny_space


def _mlp(seed: int, *, norm: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(3, 4)]
    if norm:
        layers.append(nn.LayerNorm(4))
    layers += [nn.ReLU(), nn.Linear(4, 2)]
    return nn.Sequential(*layers)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_synflow_matches_the_closed_form_of_a_two_layer_mlp() -> None:
    model = _mlp(0)
    w1, b1 = model[0].weight.detach().abs().tolist(), model[0].bias.detach().abs().tolist()
    w2 = model[2].weight.detach().abs().tolist()
    # all-ones input, |theta| everywhere: every pre-activation is positive, ReLU is identity.
    # R = sum_k sum_i w2[k][i] * h[i] + ..., h[i] = sum_j w1[i][j] + b1[i]
    h = [sum(w1[i]) + b1[i] for i in range(4)]
    col = [sum(w2[k][i] for k in range(2)) for i in range(4)]  # dR/dh[i]
    expected = sum(w1[i][j] * col[i] for i in range(4) for j in range(3))  # dR/dw1 = col[i]
    expected += sum(w2[k][i] * h[i] for k in range(2) for i in range(4))  # dR/dw2 = h[i]
    assert synflow(model, (3,)) == pytest.approx(expected, rel=1e-12)


def test_synflow_bypasses_layer_norm() -> None:
    # with LayerNorm bypassed the score is the plain MLP's; kept, it would divide the first
    # layer's output by its own scale
    with_norm, plain = _mlp(1, norm=True), _mlp(1)
    assert synflow(with_norm, (3,)) == pytest.approx(synflow(plain, (3,)), rel=1e-12)


def test_synflow_leaves_the_model_as_it_was() -> None:
    model = create_model("spvit_test", seed=0).train()
    before = _state(model)
    score = synflow(model, (3, 32, 32))
    assert math.isfinite(score) and score > 0
    assert _same_state(before, _state(model))
    assert model.training
    assert next(model.parameters()).grad is None
    assert synflow(model, (3, 32, 32)) == score


def test_naswot_of_a_hand_computed_kernel() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model[0].bias.copy_(torch.tensor([0.0, 0.0, -1.5]))
    images = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    # codes: (1, 1, 1), (1, 0, 0), (0, 0, 0); K[i][j] = units on which i and j agree
    # K = [[3, 1, 0], [1, 3, 2], [0, 2, 3]], det = 3 * (9 - 4) - 1 * (3 - 0) = 12
    assert naswot(model, images, activations=[model[1]]) == pytest.approx(math.log(12))


def test_naswot_of_two_images_with_one_code_is_minus_infinity() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    images = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    assert naswot(model, images, activations=[model[1]]) == -math.inf


def test_naswot_needs_activations() -> None:
    with pytest.raises(ValueError, match="activations"):
        naswot(nn.Linear(2, 2), torch.ones(2, 2))


def _reference_naswot(model: nn.Module, images: torch.Tensor) -> float:
    """Codes read at the MLP's first linear layer's outputs, K by counting agreements."""
    outputs: list[torch.Tensor] = []
    handles = [blk.mlp.fc1.register_forward_hook(lambda m, i, o: outputs.append(o))
               for blk in model.blocks]
    model.eval()
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    n = images.shape[0]
    codes = [[v > 0 for o in outputs for v in o[i].flatten().tolist()] for i in range(n)]
    kernel = torch.tensor([[float(sum(a == b for a, b in zip(codes[i], codes[j], strict=True)))
                            for j in range(n)] for i in range(n)], dtype=torch.float64)
    return float(torch.linalg.slogdet(kernel).logabsdet)


def test_naswot_on_an_spvit_matches_the_reference_and_leaves_it_unchanged() -> None:
    model = create_model("spvit_test", seed=0).train()
    assert len(mlp_activations(model)) == len(model.blocks)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = _state(model)
    score = naswot(model, images)
    assert model.training
    assert _same_state(before, _state(model))
    assert score == pytest.approx(_reference_naswot(create_model("spvit_test", seed=0), images),
                                  rel=1e-9)


def test_scorer_is_seeded_and_deterministic() -> None:
    space = SearchSpace.from_dict(tiny_space())
    specs = [space.sample_feasible(random.Random(s)).spec for s in range(3)]
    scorer = ZeroCostScorer.for_space(space, batch_size=16)
    assert scorer.images.shape == (16, 1, 16, 16)
    first = [scorer(s) for s in specs]
    again = [ZeroCostScorer.for_space(space, batch_size=16)(s) for s in specs]
    for a, b in zip(first, again, strict=True):
        assert (a["synflow"], a["naswot"]) == (b["synflow"], b["naswot"])
        assert a["synflow"] > 0 and math.isfinite(a["naswot"])
    assert len({a["synflow"] for a in first}) == len(specs)
    other_seed = ZeroCostScorer(scorer.images, seed=1)(specs[0])
    assert other_seed["synflow"] != first[0]["synflow"]
