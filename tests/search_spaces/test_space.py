"""SearchSpace: loading, sampling, membership, size, Optuna suggest, constraints, round trips."""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from search_spaces import SearchSpace
from spvit.arch import ArchSpec, BlockSpec
from spvit.cost import estimate
from spvit.errors import ConfigError

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
SHIPPED = ("digits", "cifar", "imagenet")

optuna.logging.set_verbosity(optuna.logging.WARNING)

# A small space with every kind of conditional choice (CLS joining late, free pooling, per-head
# priors, sharing) that is still small enough to enumerate completely.
TINY = """
name: tiny
arch: {img_size: 16, patch_size: 4, in_chans: 1, num_classes: 3, head: cls, cls_block: -1,
       pool_width_factor: 2}
dimensions:
  depth: [2, 3]
  embed_dim: [8, 16]
  heads: [1, 2]
  prior: {types: [none, mlp, rpb], per_head: true}
  pool: {free: true, max_pools: 1, from_block: 1}
  share: [false, true]
training: {dataset: digits, epochs: 1}
"""


def load_text(text: str, **kwargs) -> SearchSpace:
    return SearchSpace.from_yaml(text, source="test.yaml", **kwargs)


class ScriptedRandom(random.Random):
    """A random.Random whose `randrange` replays a fixed decision list (then picks 0)."""

    def __init__(self, decisions: list[int]) -> None:
        super().__init__(0)
        self.decisions = decisions
        self.radices: list[int] = []

    def randrange(self, n, *args, **kwargs):
        k = len(self.radices)
        self.radices.append(n)
        return self.decisions[k] if k < len(self.decisions) else 0


def enumerate_space(space: SearchSpace) -> list[ArchSpec]:
    """Every leaf of the space's decision tree, by depth-first replay through `sample`."""
    out, decisions = [], []
    while True:
        rng = ScriptedRandom(decisions)
        out.append(space.sample(rng))
        full = decisions + [0] * (len(rng.radices) - len(decisions))
        # odometer: bump the last decision that has room, drop everything after it
        k = len(full) - 1
        while k >= 0 and full[k] + 1 >= rng.radices[k]:
            k -= 1
        if k < 0:
            return out
        decisions = full[:k] + [full[k] + 1]


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request) -> SearchSpace:
    return SearchSpace.load(SPACES / f"{request.param}.yaml")


# ---------------------------------------------------------------------------- shipped files
def test_shipped_spaces_have_the_required_dimensions(shipped):
    names = {d.name for d in shipped.dimensions()}
    assert {"depth", "embed_dim", "mlp_ratio", "init", "heads_{i}", "share_{i}",
            "pool_{i}"} <= names
    assert "prior_{i}" in names or "prior_{i}_{h}" in names
    # digits runs the measured winner, TPE; the larger spaces `auto` (TPE below 250 trials)
    assert shipped.search.sampler == ("tpe" if shipped.name == "digits" else "auto")
    assert shipped.size() > 1000
    assert shipped.constraints.max_gflops and shipped.constraints.max_params


def test_digits_space_is_the_small_embedded_default():
    space = SearchSpace.load(SPACES / "digits.yaml")
    assert space.training.dataset == "digits"
    assert (space.fixed["img_size"], space.fixed["patch_size"], space.fixed["in_chans"],
            space.fixed["num_classes"]) == (16, 2, 1, 10)
    assert set(space.prior.types) == {"none", "mlp", "gaussian", "axial", "rpb", "decay"}
    assert set(space.choices["init"]) == {"trunc_normal", "mimetic", "impulse3",
                                             "impulse3_mimetic"}
    assert 12 <= space.search.trials <= 32 and space.search.concurrent == 2


def test_every_sample_is_a_valid_member(shipped):
    for rng in (random.Random(1), np.random.default_rng(1)):
        for _ in range(150):
            spec = shipped.sample(rng)
            assert shipped.why_not(spec) is None
            assert spec in shipped
            assert ArchSpec.from_dict(spec.to_dict()) == spec  # passes ArchSpec validation again
            assert ArchSpec.from_dict(spec.to_flat()) == spec


def test_samples_are_reproducible_and_cover_the_conditional_features(shipped):
    a = [shipped.sample(random.Random(7)) for _ in range(3)]
    b = [shipped.sample(random.Random(7)) for _ in range(3)]
    assert a == b
    rng = random.Random(3)
    specs = [shipped.sample(rng) for _ in range(300)]
    assert any(b.pool for s in specs for b in s.blocks)
    assert any(b.share for s in specs for b in s.blocks)
    assert {p for s in specs for b in s.blocks for p in b.head_priors} == set(shipped.prior.types)
    assert {s.depth for s in specs} == set(shipped.choices["depth"])


def test_rng_must_be_explicit(shipped):
    with pytest.raises(TypeError, match="random.Random or a numpy"):
        shipped.sample(0)


def test_resolved_yaml_round_trips_and_saves_atomically(shipped, tmp_path):
    again = load_text(shipped.to_yaml())
    assert again == shipped
    assert pickle.loads(pickle.dumps(shipped)) == shipped  # travels to Ray workers
    shipped.save(tmp_path / "run" / "space.yaml")
    assert SearchSpace.load(tmp_path / "run" / "space.yaml") == shipped
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["space.yaml"]  # no temp files left


# ---------------------------------------------------------------------------- size and membership
def test_size_counts_exactly_the_members_of_an_enumerable_space():
    space = load_text(TINY)
    members = enumerate_space(space)
    assert len(set(members)) == len(members) == space.size()
    for spec in members:
        assert space.contains(spec)
        ArchSpec.from_dict(spec.to_dict())
    # the conditional rules are really exercised
    assert any(b.share for s in members for b in s.blocks)
    assert any(b.pool for s in members for b in s.blocks)
    assert all(not s.blocks[s.cls_block].share for s in members)
    assert all(s.cls_block == s.depth - 1 for s in members)


def test_size_of_a_schedule_space_matches_enumeration():
    text = TINY.replace("pool: {free: true, max_pools: 1, from_block: 1}",
                        "pool: {schedules: [[], [1], [1, 2]]}")
    text = text.replace("per_head: true", "per_head: false")
    # patch 2: 8x8 -> 4x4 -> 2x2, so [1, 2] fits at depth 3; patch 4: 4x4 -> 2x2 pools once
    space = load_text(text.replace("patch_size: 4,", "").replace(
        "depth: [2, 3]", "depth: [2, 3]\n  patch_size: [2, 4]"))
    members = enumerate_space(space)
    assert len(set(members)) == len(members) == space.size()
    pooled = {(s.patch_size, s.depth, tuple(i for i, b in enumerate(s.blocks) if b.pool))
              for s in members}
    assert {p for p in pooled if p[2] == (1, 2)} == {(2, 3, (1, 2))}
    assert {p[:2] for p in pooled} == {(2, 2), (2, 3), (4, 2), (4, 3)}
    with pytest.raises(ConfigError, match=r"pool schedule \[1, 2\] fits no depth"):
        load_text(text)  # patch 4 only


def test_why_not_names_the_reason():
    space = load_text(TINY)
    base = ArchSpec(blocks=(BlockSpec(heads=2, prior=("mlp", "rpb")), BlockSpec(heads=1)),
                    img_size=16, patch_size=4, in_chans=1, num_classes=3, head="cls",
                    cls_block=1, pool_width_factor=2, embed_dim=8)
    assert space.why_not(base) is None
    cases = {
        "embed_dim 32": base.replace(embed_dim=32),
        "depth 1": base.replace(blocks=base.blocks[:1], cls_block=0),
        "cls_block 0": base.replace(cls_block=0),
        "heads_1 4": base.replace(blocks=(base.blocks[0], BlockSpec(heads=4))),
        "prior 'gaussian'": base.replace(blocks=(BlockSpec(heads=1, prior="gaussian"),
                                                 base.blocks[1])),
        "img_size 32": base.replace(img_size=32),
        "init 'mimetic'": base.replace(init="mimetic"),
    }
    for needle, spec in cases.items():
        reason = space.why_not(spec)
        assert reason is not None and needle in reason, (needle, reason)
        assert not space.contains(spec)
    blocks_per_block_prior = load_text(TINY.replace("per_head: true", "per_head: false"))
    assert "per-head" in blocks_per_block_prior.why_not(base)
    no_share = load_text(TINY.replace("share: [false, true]", "share: [false]"))
    shared = ArchSpec(blocks=(BlockSpec(heads=1), BlockSpec(heads=1, share=True),
                              BlockSpec(heads=1)),
                      img_size=16, patch_size=4, in_chans=1, num_classes=3, head="cls",
                      cls_block=2, pool_width_factor=2, embed_dim=8)
    assert space.contains(shared)
    assert "share_1" in no_share.why_not(shared)
    space32 = load_text(TINY.replace("img_size: 16", "img_size: 32"))  # 8x8 grid: two pools fit
    pooled_twice = shared.replace(img_size=32, blocks=(
        BlockSpec(heads=1), BlockSpec(heads=1, pool=True), BlockSpec(heads=1, pool=True)))
    assert "max_pools 1" in space32.why_not(pooled_twice)
    pooled_first = shared.replace(img_size=32, blocks=(
        BlockSpec(heads=1, pool=True), BlockSpec(heads=1), BlockSpec(heads=1)))
    assert "only from block 1" in space32.why_not(pooled_first)


# ---------------------------------------------------------------------------- Optuna
def _check_params(space: SearchSpace, trial, spec: ArchSpec) -> None:
    flat = spec.to_flat()
    for name, value in trial.params.items():
        parts = name.split("_")
        if name.startswith("prior_") and len(parts) == 3:  # per-head label prior_i_h
            assert spec.blocks[int(parts[1])].head_priors[int(parts[2])] == value
        else:
            assert flat[name] == value, name
    # a per-block choice exists only up to the sampled depth
    for name in trial.params:
        if name.split("_")[0] in ("heads", "prior", "share", "pool"):
            assert int(name.split("_")[1]) < spec.depth


@pytest.mark.parametrize("sampler", ["nsga2", "tpe"])
def test_optuna_suggest_gives_members_under_flat_labels(sampler):
    for name in SHIPPED:
        space = SearchSpace.load(SPACES / f"{name}.yaml")
        made = (optuna.samplers.NSGAIISampler(population_size=4, seed=0) if sampler == "nsga2"
                else optuna.samplers.TPESampler(seed=0, n_startup_trials=4))
        study = optuna.create_study(directions=["maximize", "minimize", "minimize"],
                                    sampler=made)
        seen = set()
        for _ in range(12):
            trial = study.ask()
            spec = space.suggest(trial)  # Optuna raises if a choice list ever changes
            assert space.why_not(spec) is None
            _check_params(space, trial, spec)
            seen.update(trial.params)
            cost = estimate(spec)
            study.tell(trial, [random.Random(trial.number).random(), cost.gflops, cost.params])
        assert "depth" in seen and "heads_0" in seen
        assert any(k.startswith("prior_") for k in seen)


def test_fixed_trial_reproduces_a_spec_from_its_params():
    space = load_text(TINY)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        spec = space.suggest(trial)
        study.tell(trial, 0.0)
        assert space.suggest(optuna.trial.FixedTrial(trial.params)) == spec


# ---------------------------------------------------------------------------- constraints
def test_constraints_reject_and_resample():
    space = SearchSpace.load(SPACES / "digits.yaml")
    tight = load_text(space.to_yaml().replace("max_gflops: 0.012", "max_gflops: 0.004"))
    rng = random.Random(0)
    specs = [tight.sample(rng) for _ in range(200)]
    over = [s for s in specs if estimate(s).gflops > 0.004]
    assert over  # the constraint binds
    lines = tight.constraints.violations(over[0])
    assert len(lines) >= 1 and lines[0].startswith("gflops ") and "> max_gflops 0.004" in lines[0]
    assert tight.constraints.values(over[0])["max_gflops"] > 0
    for _ in range(20):
        cand = tight.sample_feasible(rng)
        assert cand.cost == estimate(cand.spec) and cand.cost.gflops <= 0.004
        assert tight.constraints.violations(cand.spec, cand.cost) == []
        assert all(v <= 0 for v in tight.constraints.values(cand.spec, cand.cost).values())


def test_min_tokens_counts_patch_tokens_of_the_smallest_grid():
    space = load_text(TINY.replace("training:", "constraints: {min_tokens: 4}\ntraining:"))
    spec = ArchSpec(blocks=(BlockSpec(heads=1), BlockSpec(heads=1, pool=True)), img_size=16,
                    patch_size=4, in_chans=1, num_classes=3, head="cls", cls_block=1,
                    pool_width_factor=2, embed_dim=8)
    assert space.constraints.violations(spec) == []  # 4x4 -> 2x2 = 4 tokens (CLS not counted)
    strict = load_text(TINY.replace("training:", "constraints: {min_tokens: 5}\ntraining:"))
    assert strict.constraints.violations(spec) == ["fewest patch tokens 4 < min_tokens 5"]


def test_an_unsatisfiable_space_is_detected_after_bounded_tries():
    text = TINY.replace("training:", "constraints: {max_params: 10}\ntraining:")
    with pytest.raises(ConfigError, match="met the constraints in 200 tries"):
        load_text(text)
    space = load_text(text, check_feasible=False)
    with pytest.raises(ConfigError, match="in 5 tries"):
        space.sample_feasible(random.Random(0), max_tries=5)


# ---------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("edit, needle", [
    (("depth: [2, 3]", "depth: []"), "empty choice list"),
    (("depth: [2, 3]", "depht: [2, 3]"), "Did you mean 'depth'"),
    (("embed_dim: [8, 16]", "embed_dim: [8, x]"), "must be an integer"),
    (("embed_dim: [8, 16]", "embed_dim: 8"), "must be a list of choices"),
    (("heads: [1, 2]", "heads: [1, 3]"), "head count 3 does not divide embed_dim 8"),
    (("cls_block: -1", "cls_block: 3"), "cls_block 3 does not fit depth 2"),
    (("training: {dataset: digits, epochs: 1}", "training: {dataset: digits, epochs: 0}"),
     "training.epochs must be an integer >= 1"),
    (("name: tiny", "name: tiny\nconstraints: {max_gflops: 0}"), "max_gflops must be > 0"),
    (("name: tiny", "name: tiny\nsearch: {sampler: cmaes}"), "search.sampler must be one of"),
    (("[none, mlp, rpb]", "[none, mlp, rbp]"), "Did you mean 'rpb'"),
])
def test_bad_files_give_one_line_with_file_and_line(edit, needle):
    text = TINY.replace(*edit)
    assert text != TINY
    with pytest.raises(ConfigError) as info:
        load_text(text)
    message = str(info.value)
    assert needle in message
    assert re.match(r"test\.yaml:\d+: ", message), message  # file and line of the bad key


def test_error_line_points_at_the_bad_key():
    text = TINY.replace("heads: [1, 2]", "heads: [1, 0]")
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "heads:" in s)
    with pytest.raises(ConfigError, match=rf"^test.yaml:{line}: dimensions.heads\[1\] must be"):
        load_text(text)


def test_impulse_init_with_a_cls_head_is_refused():
    text = TINY.replace("depth: [2, 3]", "depth: [2, 3]\n  init: [trunc_normal, impulse3]")
    with pytest.raises(ConfigError, match="needs head: avg"):
        load_text(text)


def test_malformed_yaml_reports_line_and_column():
    with pytest.raises(ConfigError, match=r"not valid YAML at line 3, column \d+"):
        load_text("name: x\narch: {img_size: 16\ndimensions: [\n")


def test_from_dict_rejects_non_mappings():
    with pytest.raises(ConfigError, match="must be a mapping"):
        SearchSpace.from_dict(["depth"])
    data = yaml.safe_load(TINY)
    data["dimensions"]["pool"] = {"schedules": [[5]]}
    with pytest.raises(ConfigError, match=r"pool schedule \[5\] fits no depth"):
        SearchSpace.from_dict(data)
    data["dimensions"]["pool"] = {"schedules": [[2]]}  # fits depth 3 only
    with pytest.raises(ConfigError, match="no pool schedule fits depth 2"):
        SearchSpace.from_dict(data)


def test_global_choices_that_clash_are_refused_at_load():
    sincos = TINY.replace("embed_dim: [8, 16]",
                          "embed_dim: [6, 16]\n  pos_embed: [learned, sincos]")
    # ArchSpec's own rule and message, with the combination of choices that breaks it.
    with pytest.raises(ConfigError, match=r"embed_dim 6 is not divisible by 4") as info:
        load_text(sincos)
    assert "pos_embed: sincos" in str(info.value) and "'embed_dim': 6" in str(info.value)
    impulse = TINY.replace("head: cls, cls_block: -1", "head: avg").replace(
        "depth: [2, 3]", "depth: [2, 3]\n  init: [trunc_normal, impulse5]\n"
                         "  pos_embed: [learned_sincos, none]")
    with pytest.raises(ConfigError, match="got pos_embed: none") as info:
        load_text(impulse)
    assert "'init': 'impulse5'" in str(info.value)
    fine = load_text(impulse.replace("[learned_sincos, none]", "[learned_sincos, sincos]"))
    assert {s.pos_embed for s in (fine.sample(random.Random(i)) for i in range(40))} == \
        {"learned_sincos", "sincos"}
