"""One-shot search: proxy study, selection for retraining, only stand-alone results on the front."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from nas import optuna_compat, pareto
from nas import study as nas_study
from nas.oneshot import (
    PROXY_ATTR,
    InheritedScorer,
    ask_feasible,
    enqueue_for_retrain,
    rescore_count,
    rescore_front,
    run_proxy_search,
    select_for_retrain,
    summarise_proxy,
    supernet_choices,
    validation_loader,
)
from search_spaces.space import SearchSpace
from spvit.arch import ArchSpec
from spvit.errors import ConfigError
from tests.messages import assert_names_value_and_fix
from tests.tiny_space import tiny_space

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


def _fake_score(spec: ArchSpec) -> dict[str, float]:
    # a deterministic stand-in for inherited-weight accuracy
    return {"val_acc": 0.5 + spec.embed_dim / 200 + 0.05 * spec.depth
            - 0.01 * sum(b.pool for b in spec.blocks)}


def test_the_package_keeps_every_name_its_callers_import():
    import nas.oneshot
    from nas.oneshot import Proposal

    assert ask_feasible is nas_study.ask_feasible and Proposal is nas_study.Proposal
    for name in nas.oneshot.__all__:
        assert getattr(nas.oneshot, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        nas.oneshot.no_such_name  # noqa: B018


def test_proxy_search_counts_feasible_candidates_and_reuses_scores():
    space = SearchSpace.load(SPACES / "digits.yaml")
    calls = []

    def scorer(spec):
        calls.append(spec)
        return _fake_score(spec)

    study = run_proxy_search(space, scorer, candidates=40, seed=0)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 40
    for t in done:
        spec = ArchSpec.from_dict(t.user_attrs["arch"])
        assert not space.constraints.violations(spec)
        assert t.values[0] == pytest.approx(_fake_score(spec)["val_acc"])
    assert len(calls) == len({json.dumps(t.user_attrs["arch"], sort_keys=True) for t in done})
    summary = summarise_proxy(study)
    assert summary.candidates == 40 and summary.seconds_per_candidate >= 0


def test_infeasible_proposals_are_told_fail_and_never_scored():
    data = SearchSpace.load(SPACES / "digits.yaml").to_dict()
    data["constraints"]["max_params"] = 60000  # rejects a good part of the digits space
    space = SearchSpace.from_dict(data)
    calls = []

    def scorer(spec):
        calls.append(spec)
        return _fake_score(spec)

    study = run_proxy_search(space, scorer, candidates=30, seed=2)
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 30 and failed
    assert len(failed) + len(complete) == len(trials)  # nothing PRUNED or left RUNNING
    for t in failed:
        spec = ArchSpec.from_dict(t.user_attrs["arch"])
        assert space.constraints.violations(spec)
        assert t.user_attrs["infeasible"] and t.user_attrs["fail_reason"].startswith("infeasible")
        assert optuna_compat.constraint_values(t)["max_params"] > 0
    for t in complete:
        assert optuna_compat.constraint_values(t)["max_params"] <= 0
    assert all(not space.constraints.violations(s) for s in calls)


def test_ask_feasible_gives_up_with_one_line_when_nothing_fits():
    data = SearchSpace.load(SPACES / "digits.yaml").to_dict()
    space = SearchSpace.from_dict(data)
    data["constraints"]["max_params"] = 10  # nothing fits
    impossible = SearchSpace.from_dict(data, check_feasible=False)
    study = optuna.create_study(directions=list(nas_study.DIRECTIONS),
                                sampler=nas_study.make_sampler("random", seed=0))
    with pytest.raises(ConfigError, match=r"rejected 5 samples in a row .*max_params"):
        ask_feasible(study, impossible, max_tries=5)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 5
    proposal = ask_feasible(study, space)
    assert proposal.trial.number == 5 and not space.constraints.violations(proposal.spec)


def test_only_stand_alone_results_reach_the_main_front(tmp_path):
    space = SearchSpace.load(SPACES / "digits.yaml")
    proxy = run_proxy_search(space, _fake_score, candidates=60, seed=1)
    complete = proxy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    picks = select_for_retrain(complete, 5)
    assert len(picks) == 5
    assert len({json.dumps(t.user_attrs["arch"], sort_keys=True) for t in picks}) == 5
    # the picks start with the proxy front
    losses = np.array([[-t.values[0], t.values[1], t.values[2]] for t in complete])
    front = {t.number for t, keep in zip(complete, pareto.non_dominated(losses), strict=True)
             if keep}
    front_archs = {json.dumps(t.user_attrs["arch"], sort_keys=True) for t in complete
                   if t.number in front}
    assert json.dumps(picks[0].user_attrs["arch"], sort_keys=True) in front_archs

    main = nas_study.open_study(optuna.storages.InMemoryStorage(), study_name="main",
                                sampler=nas_study.make_sampler("random", seed=0), resume=False)
    assert enqueue_for_retrain(main, picks, proxy_study=proxy.study_name) == 5
    assert enqueue_for_retrain(main, picks, proxy_study=proxy.study_name) == 0  # no doubles
    search = nas_study.SearchStudy(main, space, run_dir=tmp_path, budget=2)
    trained = {}
    for i in range(5):
        candidate = search.ask()
        # stand-alone accuracy: deliberately unlike the proxy score
        acc = 0.3 + 0.1 * i
        trained[candidate.number] = acc
        search.tell_result(candidate, {"epoch": 2, "val_acc": acc})
    trials = main.get_trials(deepcopy=False)
    assert {json.dumps(t.user_attrs["arch"], sort_keys=True) for t in trials} == \
        {json.dumps(t.user_attrs["arch"], sort_keys=True) for t in picks}
    for t in pareto.pareto_trials(main):
        assert t.values[0] == trained[t.number]  # the stand-alone result, never the proxy
        assert PROXY_ATTR in t.user_attrs and t.user_attrs["proxy_study"] == proxy.study_name
    proxies = {t.number: t.values[0] for t in picks}
    assert all(t.user_attrs[PROXY_ATTR] == proxies[t.user_attrs["proxy_trial"]] for t in trials)


def test_select_refuses_bad_k():
    with pytest.raises(ValueError, match="`trials` must be an integer >= 1"):
        select_for_retrain([SimpleNamespace(values=[0.5, 1, 1], user_attrs={"arch": {}})], 0)


def test_one_pick_per_architecture_however_its_attr_is_spelt():
    spec = ArchSpec.uniform(depth=2, heads=2, img_size=8, patch_size=4, embed_dim=8,
                            num_classes=2, mlp_ratio=2.0)
    other = spec.replace(embed_dim=16)
    respelt = {k: v for k, v in spec.to_flat().items() if k != "prior_0"}
    respelt.update(prior_0_0="none", prior_0_1="none")  # one prior per head, all the same
    assert respelt != spec.to_flat() and nas_study.stored_arch(respelt) == spec
    trials = [SimpleNamespace(number=n, values=values, user_attrs={"arch": arch})
              for n, (values, arch) in enumerate([([0.5, 1, 1], spec.to_flat()),
                                                  ([0.6, 1, 1], respelt),
                                                  ([0.4, 2, 2], other.to_flat())])]
    picks = select_for_retrain(trials, 3)
    assert sorted(t.number for t in picks) == [1, 2]  # the better score of the two spellings
    for garbage in (None, {}, {"depth": 0}, "a string"):
        assert nas_study.stored_arch(garbage) is None


def test_free_pool_spaces_give_every_schedule():
    data = SearchSpace.load(SPACES / "digits.yaml").to_dict()
    data["dimensions"]["pool"] = {"free": True, "max_pools": 2, "from_block": 1}
    space = SearchSpace.from_dict(data)
    schedules = supernet_choices(space).pool_schedules
    assert () in schedules and (1, 3) in schedules and (1, 2, 3) not in schedules


def test_choices_of_the_shipped_spaces_follow_the_new_fields():
    choices = supernet_choices(SearchSpace.load(SPACES / "cifar.yaml"))
    assert choices.pos_embeds == ("learned_sincos",)
    assert "decay" in choices.prior_types
    # the spaces do not search residual scaling or the conv pos placement: ArchSpec defaults
    assert choices.skip_lams == (1.0,) and choices.conv_pos_places == ("before_attn",)


# ---------------------------------------------------------------------------- fine-tuned scores
TINY = tiny_space(batch_size=128, weight_decay=0.05)


def _plain_finetune_then_evaluate(net, spec, batches, *, steps, lr, weight_decay, seed):
    """The reference: an inherited copy, AdamW with a hand-written cosine, then accuracy."""
    import torch
    import torch.nn.functional as F

    model = net.subnet(spec)
    nwd = model.no_weight_decay()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in nwd]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and n not in nwd)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=lr)
    torch.manual_seed(seed)
    model.train()
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * i / steps))
        x, y = batches[i % len(batches)]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in validation_loader(SearchSpace.from_dict(TINY)):
            keep = y >= 0
            correct += int((model(x).argmax(-1)[keep] == y[keep]).sum())
            total += int(keep.sum())
    return correct / total


def test_finetuned_score_matches_a_plain_loop_and_leaves_the_supernet_alone():
    import torch

    from spvit.supernet import SPViTSupernet

    space = SearchSpace.from_dict(json.loads(json.dumps(TINY)))
    net = SPViTSupernet(supernet_choices(space), seed=0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    spec = space.sample_feasible(__import__("random").Random(3)).spec
    plain = InheritedScorer.for_space(net, space)(spec)
    tuned_scorer = InheritedScorer.for_space(net, space, finetune_steps=6)
    assert len(tuned_scorer.train_batches) == 6  # 1,437 training images / 128 > 6 batches
    tuned = tuned_scorer(spec)
    assert tuned["finetune_steps"] == 6 and plain["finetune_steps"] == 0
    # deterministic: the same batches, the same dropout draws, the same score
    assert tuned_scorer(spec)["val_acc"] == tuned["val_acc"]
    # the supernet is untouched by fine-tuning (it scores the next candidate as before)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert InheritedScorer.for_space(net, space)(spec)["val_acc"] == plain["val_acc"]
    ref = _plain_finetune_then_evaluate(net, spec, tuned_scorer.train_batches, steps=6,
                                        lr=2.0e-3, weight_decay=0.05, seed=0)
    assert tuned["val_acc"] == pytest.approx(ref, abs=1e-9)
    # six steps at 2e-3 move a random-init subnet off its initial accuracy
    assert tuned["val_acc"] != plain["val_acc"]
    # another peak learning rate than the recipe's: the same loop at that rate
    slow = InheritedScorer.for_space(net, space, finetune_steps=6, lr=2.0e-4)
    assert slow.lr == 2.0e-4 and tuned_scorer.lr == 2.0e-3
    ref = _plain_finetune_then_evaluate(net, spec, slow.train_batches, steps=6,
                                        lr=2.0e-4, weight_decay=0.05, seed=0)
    assert slow(spec)["val_acc"] == pytest.approx(ref, abs=1e-9)


@pytest.mark.parametrize("steps", [-1, 1.5, True])
def test_bad_finetune_steps_are_refused_with_one_line(steps):
    from spvit.supernet import SPViTSupernet

    space = SearchSpace.from_dict(json.loads(json.dumps(TINY)))
    net = SPViTSupernet(supernet_choices(space), seed=0)
    with pytest.raises(ConfigError) as e:
        InheritedScorer(net, [], finetune_steps=steps)
    assert_names_value_and_fix(str(e.value), "`oneshot.finetune_steps`", repr(steps))
    with pytest.raises(ConfigError, match="needs training batches"):
        InheritedScorer(net, [], finetune_steps=2)


def test_rescore_replaces_the_accuracy_of_the_short_list_only():
    space = SearchSpace.load(SPACES / "digits.yaml")
    proxy = run_proxy_search(space, _fake_score, candidates=40, seed=2)
    complete = proxy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    short = select_for_retrain(complete, 8)
    seen = []

    def tuned(spec):  # a fine-tuned score that reverses the inherited order by width
        seen.append(spec)
        return {"val_acc": 1.0 - spec.embed_dim / 200, "seconds": 0.5}

    again = rescore_front(complete, tuned, k=8, steps=20)
    assert [t.number for t in again] == [t.number for t in short] and len(seen) == 8
    for new, old in zip(again, short, strict=True):
        assert new.values[0] == 1.0 - new.user_attrs["arch"]["embed_dim"] / 200
        assert new.values[1:] == old.values[1:]
        assert new.user_attrs["inherited_val_acc"] == old.values[0]
        assert new.user_attrs["finetune_steps"] == 20 and new.user_attrs["rescore_s"] == 0.5
    # the proxy study keeps its inherited scores
    assert [t.values[0] for t in proxy.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))] == \
        [t.values[0] for t in complete]
    main = nas_study.open_study(optuna.storages.InMemoryStorage(), study_name="main",
                                sampler=nas_study.make_sampler("random", seed=0), resume=False)
    picks = select_for_retrain(again, 3)
    assert enqueue_for_retrain(main, picks, proxy_study=proxy.study_name) == 3
    for t, pick in zip(main.get_trials(deepcopy=False), picks, strict=True):
        assert t.user_attrs[PROXY_ATTR] == pick.values[0]
        assert t.user_attrs["proxy_inherited_val_acc"] == pick.user_attrs["inherited_val_acc"]
        assert t.user_attrs["proxy_finetune_steps"] == 20
    with pytest.raises(ConfigError) as e:
        rescore_count(6, 4)
    assert_names_value_and_fix(str(e.value), "`oneshot.rescore`", "4")
    assert rescore_count(6, None) == 24


def test_prepare_oneshot_queues_picks_from_fine_tuned_scores(tmp_path, monkeypatch):
    import nas.oneshot
    from spvit.supernet import SPViTSupernet

    space = SearchSpace.from_dict(json.loads(json.dumps(TINY)))
    net = SPViTSupernet(supernet_choices(space), seed=0)
    folder = SimpleNamespace(net=net, path=tmp_path / "sn", epochs=0,
                             check_space=lambda s: None)
    monkeypatch.setattr(nas.oneshot.selection, "open_supernet", lambda path, **kw: folder)
    main = nas_study.open_study(optuna.storages.InMemoryStorage(), study_name="main",
                                sampler=nas_study.make_sampler("random", seed=0), resume=False)
    said = []
    plan = nas.oneshot.prepare_oneshot(main, space, tmp_path / "sn", run_dir=tmp_path,
                                       retrain=2, candidates=12, finetune_steps=2, rescore=4,
                                       say=said.append)
    assert plan.queued == 2
    assert any("re-scored 4 of the proxy front after 2 fine-tuning steps" in s for s in said)
    queued = main.get_trials(deepcopy=False)
    assert all(t.user_attrs["proxy_finetune_steps"] == 2 for t in queued)
    # each pick's proxy score is its fine-tuned one, computed again here independently
    tuned = InheritedScorer.for_space(net, space, finetune_steps=2)
    for t in queued:
        spec = ArchSpec.from_dict(t.user_attrs["proxy_arch"])
        assert t.user_attrs[PROXY_ATTR] == tuned(spec)["val_acc"]
        assert t.user_attrs["proxy_inherited_val_acc"] == \
            InheritedScorer.for_space(net, space)(spec)["val_acc"]
