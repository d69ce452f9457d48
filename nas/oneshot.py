"""One-shot search: a weight-sharing supernet over a search space scores candidates with inherited
weights; only the best of them are trained stand-alone.

The pieces, all without Ray or DeepSpeed (one training epoch is `nas.sandwich`, the training
run `launch.supernet`):

* `supernet_choices(space)`: the glue from a `SearchSpace` to the plain `SupernetChoices` that
  `spvit.supernet.SPViTSupernet` is built from;
* `SandwichSampler`: the subnets of one supernet training step (the sandwich rule: the largest
  and the smallest feasible subnet plus random feasible ones), seeded by (seed, epoch, step) so
  that every data-parallel worker trains the same subnets;
* `SupernetFolder` / `open_supernet`: a trained supernet folder (its space, choices, weights);
* `InheritedScorer`: a subnet's validation accuracy with inherited weights (evaluation only),
  or after a few fine-tuning steps of a stand-alone copy (`finetune_steps`), which ranks
  candidates better at a cost of seconds per candidate (docs/BENCHMARKS.md);
* `run_proxy_search`: an Optuna multi-objective study of its own over the same space, objective
  the inherited-weight accuracy (plus GFLOPs and parameters), thousands of candidates cheaply;
  `ask_feasible` proposes its trials under the search study's rule (a proposal that breaks a
  constraint is told FAIL, never scored);
* `rescore_front`: the proxy front's short list scored again after fine-tuning;
* `select_for_retrain` (non-dominated rank, then crowding distance) and `enqueue_for_retrain`,
  which puts the picks into the main search study as WAITING trials with their proxy score as a
  user attr. The main search then trains them stand-alone through its normal trial path, so its
  Pareto front, plots and exports hold stand-alone results only.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from search_spaces.space import SearchSpace
from spvit.arch import ArchSpec, BlockSpec
from spvit.cost import estimate
from spvit.errors import ConfigError
from spvit.io import atomic_write_json, load_safetensors
from spvit.supernet import SPViTSupernet, SupernetChoices

SUPERNET_FILE = "supernet.json"
WEIGHTS_FILE = "supernet.safetensors"
SPACE_FILE = "space.yaml"
METRICS_FILE = "metrics.jsonl"
PROXY_ATTR = "proxy_val_acc"
DEFAULT_CANDIDATES = 2000
DEFAULT_RANDOM_SUBNETS = 2
# With fine-tuned re-scoring, the proxy front's short list is this many times `--retrain`.
DEFAULT_RESCORE_FACTOR = 4
EXTREME_PROBES = 400  # feasible samples drawn to find the largest / smallest subnet
_ARCH_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ArchSpec) if f.name != "blocks"}


# ---------------------------------------------------------------------------- space -> supernet
def _free_schedules(depth: int, *, from_block: int, max_pools: int) -> list[tuple[int, ...]]:
    blocks = range(from_block, depth)
    return [s for k in range(max_pools + 1) for s in itertools.combinations(blocks, k)]


def _field_values(space: SearchSpace, name: str) -> tuple:
    """The values of the global `ArchSpec` field `name` in `space`; a field the space does not
    name keeps its `ArchSpec` default."""
    if name in space.choices or name in space.fixed:
        return tuple(space.values_of(name))
    return (_ARCH_DEFAULTS[name],)


def supernet_choices(space: SearchSpace) -> SupernetChoices:
    """What a supernet over `space` must hold, from the space's dimensions."""
    fixed = space.fixed
    v = functools.partial(_field_values, space)
    if space.pool.free:
        schedules: set[tuple[int, ...]] = set()
        for depth in v("depth"):
            schedules.update(_free_schedules(depth, from_block=space.pool.from_block,
                                             max_pools=space.pool.max_pools))
        pool_schedules: Any = tuple(sorted(schedules))
    else:
        pool_schedules = tuple(space.pool.schedules)
    return SupernetChoices(
        img_size=fixed["img_size"], in_chans=fixed["in_chans"], num_classes=fixed["num_classes"],
        stem=fixed["stem"], head=fixed["head"], cls_block=fixed["cls_block"],
        depths=tuple(v("depth")), patch_sizes=tuple(v("patch_size")),
        embed_dims=tuple(v("embed_dim")), mlp_ratios=tuple(v("mlp_ratio")),
        pool_width_factors=tuple(v("pool_width_factor")), heads=tuple(space.heads),
        prior_types=tuple(space.prior.types), pos_embeds=tuple(v("pos_embed")),
        conv_pos=tuple(v("conv_pos")), qkv_bias=tuple(v("qkv_bias")),
        pool_schedules=pool_schedules, share=tuple(space.share),
        skip_lams=v("skip_lam"), conv_pos_places=v("conv_pos_place"))


def space_identity(space: SearchSpace) -> dict[str, Any]:
    """What a supernet depends on: the fixed fields and the dimensions (not the recipe)."""
    data = space.to_dict()
    return {"arch": data["arch"], "dimensions": data["dimensions"]}


# ---------------------------------------------------------------------------- sandwich rule
class _ExtremeChooser:
    """A stand-in for an Optuna trial that answers every choice with its largest (or smallest)
    option; choices that do not change the size (prior type, init, ...) come from `rng`."""

    def __init__(self, largest: bool, rng: random.Random) -> None:
        self.largest = largest
        self.rng = rng

    def suggest_categorical(self, name: str, choices: list) -> Any:
        big = self.largest
        if name in ("depth", "embed_dim", "mlp_ratio", "pool_width_factor") \
                or name.startswith("heads_"):
            return max(choices) if big else min(choices)
        if name == "patch_size":
            return min(choices) if big else max(choices)
        if name.startswith(("pool_", "share_")):
            return (not big) if (not big) in choices else choices[0]
        if name in ("conv_pos", "qkv_bias"):
            return big if big in choices else choices[0]
        return choices[self.rng.randrange(len(choices))]


def _cost_key(spec: ArchSpec) -> tuple[float, int]:
    cost = estimate(spec)
    return (cost.gflops, cost.params)


def extreme_subnet(space: SearchSpace, *, largest: bool, seed: int = 0) -> ArchSpec:
    """The largest (or smallest) feasible member of `space`, by GFLOPs then parameters.

    The member built from every dimension's extreme is used when it meets the constraints;
    otherwise the extreme of `EXTREME_PROBES` seeded feasible samples.
    """
    rng = random.Random(seed)
    spec = space.suggest(_ExtremeChooser(largest, rng))
    if not space.constraints.violations(spec):
        return spec
    probes = [space.sample_feasible(rng).spec for _ in range(EXTREME_PROBES)]
    return (max if largest else min)(probes, key=_cost_key)


def redraw_priors(space: SearchSpace, spec: ArchSpec, rng: random.Random) -> ArchSpec:
    """`spec` with fresh prior types for every block that computes its own attention."""
    types = space.prior.types
    blocks = []
    for b in spec.blocks:
        if b.share:
            blocks.append(b)
            continue
        if space.prior.per_head:
            prior: Any = tuple(types[rng.randrange(len(types))] for _ in range(b.heads))
        else:
            prior = types[rng.randrange(len(types))]
        blocks.append(BlockSpec(heads=b.heads, prior=prior, share=False, pool=b.pool))
    return spec.replace(blocks=tuple(blocks))


class SandwichSampler:
    """The subnets of each supernet training step: [largest, smallest, random...].

    The largest and smallest keep their structure (found once, `extreme_subnet`) and draw new
    prior types every step, so every prior family is trained at both ends of the size range;
    a redraw that breaks a constraint falls back on the reference. The random subnets are
    `space.sample_feasible` draws. Every subnet returned meets the space's constraints.

    Args:
        space: the search space.
        seed: with (epoch, step), the only source of randomness: workers agree on the subnets.
        random_subnets: random subnets per step (>= 0; the sandwich rule uses >= 2).
    """

    def __init__(self, space: SearchSpace, *, seed: int = 0,
                 random_subnets: int = DEFAULT_RANDOM_SUBNETS) -> None:
        if isinstance(random_subnets, bool) or not isinstance(random_subnets, int) \
                or random_subnets < 0:
            raise ConfigError(f"random_subnets must be an integer >= 0, but got"
                              f" {random_subnets!r}. Use e.g. 2.")
        self.space = space
        self.seed = seed
        self.random_subnets = random_subnets
        self.largest = extreme_subnet(space, largest=True, seed=seed)
        self.smallest = extreme_subnet(space, largest=False, seed=seed)

    @property
    def per_step(self) -> int:
        return 2 + self.random_subnets

    def _feasible(self, spec: ArchSpec) -> bool:
        return not self.space.constraints.violations(spec)

    def step(self, epoch: int, step: int) -> list[ArchSpec]:
        rng = random.Random((self.seed * 1_000_003 + epoch * 7_919 + step) % (2**63 - 1))
        out = []
        for ref in (self.largest, self.smallest):
            spec = redraw_priors(self.space, ref, rng)
            out.append(spec if self._feasible(spec) else ref)
        out.extend(self.space.sample_feasible(rng).spec for _ in range(self.random_subnets))
        return out


# ---------------------------------------------------------------------------- supernet folders
@dataclass
class SupernetFolder:
    """A trained supernet folder: `space.yaml`, `supernet.json`, `supernet.safetensors`."""

    path: Path
    space: SearchSpace
    info: dict[str, Any]
    net: SPViTSupernet

    @property
    def epochs(self) -> int:
        return int(self.info.get("epochs_trained", 0))

    def check_space(self, space: SearchSpace) -> None:
        """`ConfigError` unless `space` has the supernet's fixed fields and dimensions."""
        ours, theirs = space_identity(self.space), space_identity(space)
        if ours == theirs:
            return
        for block in ("arch", "dimensions"):
            for key in sorted(set(ours[block]) | set(theirs[block])):
                a, b = ours[block].get(key), theirs[block].get(key)
                if a != b:
                    raise ConfigError(
                        f"supernet {self.path} was trained on space {self.space.name!r} with"
                        f" {block}.{key} {a!r}, but the search space {space.name!r} has {b!r}."
                        " Train a supernet on this space (spvit-nas supernet train) or pass"
                        " the matching --space.")

    def why_not(self, spec: ArchSpec) -> str | None:
        return self.space.why_not(spec) or self.net.choices.why_not(spec)


def open_supernet(path: str | Path, *, device: str = "cpu") -> SupernetFolder:
    """Load a supernet folder written by `spvit-nas supernet train`; `ConfigError` if it is not
    one (missing, no weights yet, unreadable)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"supernet folder {path} does not exist. Pass the --out folder of"
                          " `spvit-nas supernet train`.")
    for name in (SPACE_FILE, SUPERNET_FILE):
        if not (path / name).is_file():
            raise ConfigError(f"{path} is not a supernet folder: {name} is missing. Pass the"
                              " --out folder of `spvit-nas supernet train`.")
    if not (path / WEIGHTS_FILE).is_file():
        raise ConfigError(f"supernet {path} has no trained weights yet ({WEIGHTS_FILE} is"
                          " written after the first epoch). Train it first.")
    space = SearchSpace.load(path / SPACE_FILE, check_feasible=False)
    try:
        info = json.loads((path / SUPERNET_FILE).read_text(encoding="utf-8"))
        choices = SupernetChoices.from_dict(info["choices"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{path / SUPERNET_FILE} is unreadable ({e}). Train the supernet"
                          " again into a new folder.") from None
    if choices != supernet_choices(space):
        raise ConfigError(f"{path / SUPERNET_FILE} does not match {path / SPACE_FILE}; the"
                          " folder was edited. Train the supernet again into a new folder.")
    net = SPViTSupernet(choices, seed=0)
    state = load_safetensors(path / WEIGHTS_FILE, what="supernet weights",
                             hint="Restore it from a copy, or train the supernet again into"
                                  " a new folder (spvit-nas supernet train).")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{path / WEIGHTS_FILE} does not fit the supernet of"
                          f" {path / SPACE_FILE} ({str(e).splitlines()[0]}). Train the supernet"
                          " again into a new folder.") from None
    return SupernetFolder(path=path, space=space, info=info, net=net.to(device).eval())


def write_supernet_info(path: Path, space: SearchSpace, sampler: SandwichSampler, *,
                        epochs_trained: int, extra: dict[str, Any] | None = None) -> None:
    """`supernet.json`: the choices, the sandwich's extremes and how far it is trained."""
    atomic_write_json(path / SUPERNET_FILE, {
        "space": space.name,
        "choices": supernet_choices(space).to_dict(),
        "largest": sampler.largest.to_flat(),
        "smallest": sampler.smallest.to_flat(),
        "random_subnets": sampler.random_subnets,
        "epochs_trained": epochs_trained,
        **(extra or {}),
    })


def check_finetune_steps(steps: Any) -> int:
    """`steps` if it is a valid number of fine-tuning steps (an integer >= 0), else
    `ConfigError` naming `--finetune-steps`, the value and the fix."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"--finetune-steps must be an integer >= 0, but got {steps!r}."
                          " Use 0 (inherited weights as they are) or e.g. 20.")
    return steps


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
                  finetune_steps: int = 0) -> InheritedScorer:
        """The scorer of `space`'s candidates: its validation split and, when fine-tuning, its
        first training batches and its recipe's learning rate and weight decay."""
        t = space.training
        batches = finetune_batches(space, finetune_steps) if finetune_steps > 0 else ()
        return cls(net, validation_loader(space), device=device, finetune_steps=finetune_steps,
                   train_batches=batches, lr=t.lr, weight_decay=t.weight_decay, seed=t.seed)

    def _finetuned(self, spec: ArchSpec) -> Any:
        import torch
        import torch.nn.functional as F
        from timm.optim import param_groups_weight_decay

        device = torch.device(self.device)
        model = self.net.subnet(spec).to(device)
        # the trials' rule: no decay on norms, biases, embeddings and priors
        groups = param_groups_weight_decay(model, self.weight_decay,
                                           no_weight_decay_list=model.no_weight_decay())
        opt = torch.optim.AdamW(groups, lr=self.lr)
        steps = self.finetune_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * i / steps)))
        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for i in range(steps):
                images, labels = self.train_batches[i % len(self.train_batches)]
                loss = F.cross_entropy(model(images.to(device)).float(), labels.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
        return model

    def __call__(self, spec: ArchSpec) -> dict[str, float]:
        import torch

        from .engine import evaluate

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
    from .data import build_datasets, build_loaders

    t = space.training
    ref = space.sample_feasible(random.Random(space.search.seed)).spec
    data = build_datasets(t, ref)
    loaders = build_loaders(data, micro_batch_size=min(t.batch_size, len(data.train)),
                            seed=t.seed)
    loaders.set_epoch(0)
    return list(itertools.islice(iter(loaders.train), steps))


def validation_loader(space: SearchSpace, *, batch_size: int = 256) -> Any:
    """The validation split of the space's dataset, as trials see it (one worker)."""
    from .data import build_datasets, build_loaders

    ref = space.sample_feasible(random.Random(space.search.seed)).spec
    data = build_datasets(space.training, ref)
    micro = min(space.training.batch_size, len(data.train))
    return build_loaders(data, micro_batch_size=micro, eval_batch_size=batch_size).val


# ---------------------------------------------------------------------------- proxy search
@dataclass(frozen=True)
class Proposal:
    """A feasible architecture proposed by a RUNNING trial of an Optuna study, with its cost."""

    trial: Any
    spec: ArchSpec
    cost: Any


def ask_feasible(study: Any, space: SearchSpace, *, max_tries: int | None = None) -> Proposal:
    """Ask `study` until a trial proposes a member of `space` that meets its constraints.

    The rule of the search study (`nas.study.SearchStudy.ask`): every asked trial gets its
    constraint values (`nas.optuna_compat.set_constraints`, which the constrained samplers
    read); a rejected one gets user attrs `arch`, `infeasible` (the broken constraints) and
    `fail_reason` and is told FAIL, never scored. `ConfigError` after `max_tries` (default the
    space's `search.max_infeasible`) rejections in a row.
    """
    from optuna.trial import TrialState

    from . import optuna_compat

    tries = space.search.max_infeasible if max_tries is None else max_tries
    reason = ""
    for _ in range(tries):
        trial = study.ask()
        try:
            spec = space.suggest(trial)
        except ConfigError as e:
            reason = f"invalid architecture: {e}"
        else:
            cost = estimate(spec)
            optuna_compat.set_constraints(study, trial, space.constraints.values(spec, cost))
            violations = space.constraints.violations(spec, cost)
            if not violations:
                return Proposal(trial=trial, spec=spec, cost=cost)
            reason = "; ".join(violations)
            trial.set_user_attr("arch", spec.to_flat())
        trial.set_user_attr("infeasible", reason)
        trial.set_user_attr("fail_reason", f"infeasible: {reason}")
        study.tell(trial, state=TrialState.FAIL)
    raise ConfigError(
        f"the constraints of space {space.name!r} rejected {tries} proposals in a row (last:"
        f" {reason}); the feasible region is empty or tiny. Loosen the `constraints:` block or"
        " narrow the space's choices to feasible ones.")


@dataclass(frozen=True)
class ProxySummary:
    """What a proxy study did: candidates scored and the mean scoring time per candidate."""

    study_name: str
    candidates: int
    scored: int
    seconds_per_candidate: float


def run_proxy_search(space: SearchSpace, scorer: Callable[[ArchSpec], dict[str, float]], *,
                     candidates: int = DEFAULT_CANDIDATES, seed: int = 0,
                     storage: Any = None, study_name: str = "oneshot-proxy",
                     population_size: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> Any:
    """An Optuna study of its own over `space`: maximise the inherited-weight accuracy,
    minimise GFLOPs and parameters, until `candidates` feasible trials are COMPLETE.

    Infeasible proposals are told FAIL (`ask_feasible`) and do not count; a repeated
    architecture reuses its score (evaluation is deterministic). Each trial keeps user attrs
    `arch`, `gflops`, `params`, `score_s` (seconds), `scored` (False: a repeat). Resumable:
    an existing study of that name continues.
    """
    import optuna

    from . import study as nas_study

    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ConfigError(f"--candidates must be an integer >= 1, but got {candidates!r}."
                          " Use e.g. 2000.")
    sampler = nas_study.make_sampler(
        "nsga2", seed=seed,
        population_size=population_size or max(8, min(100, candidates // 20)))
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler,
                                directions=list(nas_study.DIRECTIONS), load_if_exists=True)
    cache: dict[str, float] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        cache[json.dumps(t.user_attrs.get("arch"), sort_keys=True)] = t.values[0]
    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    while done < candidates:
        proposal = ask_feasible(study, space)
        spec, cost, trial = proposal.spec, proposal.cost, proposal.trial
        key = json.dumps(spec.to_flat(), sort_keys=True)
        start = time.perf_counter()
        scored = key not in cache
        if not scored:
            acc = cache[key]
            seconds = 0.0
        else:
            result = scorer(spec)
            acc = float(result["val_acc"])
            seconds = time.perf_counter() - start
            cache[key] = acc
        trial.set_user_attr("arch", spec.to_flat())
        trial.set_user_attr("gflops", float(cost.gflops))
        trial.set_user_attr("params", int(cost.params))
        trial.set_user_attr("score_s", seconds)
        trial.set_user_attr("scored", scored)
        study.tell(trial, [acc, float(cost.gflops), float(cost.params)])
        done += 1
        if progress is not None:
            progress(done, candidates)
    return study


def summarise_proxy(study: Any) -> ProxySummary:
    import optuna

    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    times = [t.user_attrs["score_s"] for t in trials if t.user_attrs.get("scored")]
    return ProxySummary(study_name=study.study_name, candidates=len(trials), scored=len(times),
                        seconds_per_candidate=float(np.mean(times)) if times else math.nan)


def _ranks(losses: np.ndarray) -> np.ndarray:
    """Non-dominated rank of each row (0 = the front), all objectives minimised."""
    from .pareto import non_dominated

    ranks = np.full(len(losses), -1)
    left = np.arange(len(losses))
    r = 0
    while left.size:
        front = non_dominated(losses[left])
        ranks[left[front]] = r
        left = left[~front]
        r += 1
    return ranks


def _crowding(losses: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance within one set of points (boundary points: infinity)."""
    n, m = losses.shape
    dist = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(m):
        order = np.argsort(losses[:, j], kind="stable")
        span = losses[order[-1], j] - losses[order[0], j]
        dist[order[0]] = dist[order[-1]] = np.inf
        if span > 0:
            dist[order[1:-1]] += (losses[order[2:], j] - losses[order[:-2], j]) / span
    return dist


def select_for_retrain(trials: Sequence[Any], k: int) -> list[Any]:
    """The `k` proxy trials to train stand-alone: lowest non-dominated rank first, and within a
    rank the most spread out (largest crowding distance); one per distinct architecture."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"--retrain must be an integer >= 1, but got {k!r}. Use e.g. 6.")
    unique: dict[str, Any] = {}
    for t in trials:
        if t.values is None:
            continue
        key = json.dumps(t.user_attrs.get("arch"), sort_keys=True)
        if key not in unique or t.values[0] > unique[key].values[0]:
            unique[key] = t
    pool = list(unique.values())
    if not pool:
        return []
    losses = np.array([[-t.values[0], t.values[1], t.values[2]] for t in pool], dtype=float)
    ranks = _ranks(losses)
    picks: list[Any] = []
    for r in range(int(ranks.max()) + 1):
        idx = np.flatnonzero(ranks == r)
        crowd = _crowding(losses[idx])
        for i in idx[np.argsort(-crowd, kind="stable")]:
            picks.append(pool[i])
            if len(picks) == k:
                return picks
    return picks


def rescore_count(retrain: int, rescore: int | None) -> int:
    """How many of the proxy front are re-scored: `rescore`, default 4 x `retrain`; at least
    `retrain` (the picks come from them)."""
    n = DEFAULT_RESCORE_FACTOR * retrain if rescore is None else rescore
    if isinstance(n, bool) or not isinstance(n, int) or n < retrain:
        raise ConfigError(f"--rescore must be an integer >= --retrain ({retrain}), but got"
                          f" {rescore!r}. Drop --rescore ({DEFAULT_RESCORE_FACTOR} x --retrain)"
                          f" or pass e.g. {DEFAULT_RESCORE_FACTOR * retrain}.")
    return n


def rescore_front(trials: Sequence[Any], scorer: Callable[[ArchSpec], dict[str, float]], *,
                  k: int, steps: int) -> list[Any]:
    """The short list of a proxy study, scored again: the `k` trials `select_for_retrain`
    ranks first, each scored by `scorer` (`InheritedScorer` with `steps` fine-tuning steps).
    Returned as copies whose accuracy objective is the new score; user attrs
    `inherited_val_acc` (the proxy study's score), `finetune_steps` and `rescore_s` (seconds)
    are added. The proxy study itself is not changed."""
    import copy

    out = []
    for t in select_for_retrain(trials, k):
        result = scorer(ArchSpec.from_dict(t.user_attrs["arch"]))
        c = copy.deepcopy(t)
        c.values = [float(result["val_acc"]), *t.values[1:]]
        c.user_attrs = {**t.user_attrs, "inherited_val_acc": float(t.values[0]),
                        "finetune_steps": int(steps), "rescore_s": float(result["seconds"])}
        out.append(c)
    return out


def enqueue_for_retrain(main_study: Any, picks: Sequence[Any], *, proxy_study: str) -> int:
    """Queue `picks` in the main study (WAITING; the search trains them stand-alone), each with
    user attrs `proxy_val_acc`, `proxy_trial`, `proxy_study` and `proxy_arch` (and, for picks
    that `rescore_front` fine-tuned, `proxy_inherited_val_acc` and `proxy_finetune_steps`).
    Returns how many were added (an architecture already queued or trained there is skipped)."""
    known = set()
    for t in main_study.get_trials(deepcopy=False):
        for key in ("arch", "proxy_arch"):
            if t.user_attrs.get(key) is not None:
                known.add(json.dumps(t.user_attrs[key], sort_keys=True))
    added = 0
    for t in picks:
        key = json.dumps(t.user_attrs.get("arch"), sort_keys=True)
        if key in known:
            continue
        attrs = {PROXY_ATTR: float(t.values[0]), "proxy_trial": t.number,
                 "proxy_study": proxy_study, "proxy_arch": t.user_attrs.get("arch")}
        if "finetune_steps" in t.user_attrs:  # re-scored after fine-tuning (`rescore_front`)
            attrs["proxy_inherited_val_acc"] = t.user_attrs["inherited_val_acc"]
            attrs["proxy_finetune_steps"] = t.user_attrs["finetune_steps"]
        main_study.enqueue_trial(dict(t.params), user_attrs=attrs)
        known.add(key)
        added += 1
    return added


@dataclass(frozen=True)
class OneShotPlan:
    """What `prepare_oneshot` queued: the proxy summary and the queued trials' count."""

    proxy: ProxySummary
    queued: int
    picks: tuple[dict[str, Any], ...] = dataclasses.field(default_factory=tuple)


def prepare_oneshot(main_study: Any, space: SearchSpace, supernet_dir: str | Path, *,
                    run_dir: str | Path, retrain: int, candidates: int = DEFAULT_CANDIDATES,
                    seed: int = 0, device: str = "cpu", finetune_steps: int = 0,
                    rescore: int | None = None,
                    say: Callable[[str], None] = print) -> OneShotPlan:
    """The one-shot stage of a search: score `candidates` subnets of `space` with the supernet
    in `supernet_dir` (proxy study in RUN_DIR/oneshot/study.journal), select `retrain` of its
    front and queue them in `main_study` for stand-alone training. With `finetune_steps` > 0
    the first `rescore` (default `DEFAULT_RESCORE_FACTOR` x `retrain`) of the proxy front are
    scored again after that many fine-tuning steps from their inherited weights
    (`rescore_front`), and the `retrain` picks are selected from those scores.

    Raises `ConfigError` if the supernet folder is missing or belongs to another space.
    """
    from .storage import make_storage

    folder = open_supernet(supernet_dir, device=device)
    folder.check_space(space)
    proxy_dir = Path(run_dir) / "oneshot"
    proxy_dir.mkdir(parents=True, exist_ok=True)
    storage = make_storage(None, proxy_dir)  # RUN_DIR/oneshot/study.journal
    scorer = InheritedScorer.for_space(folder.net, space, device=device)
    say(f"one-shot: scoring {candidates} candidates with supernet {folder.path}"
        f" ({folder.epochs} epochs trained)")
    study = run_proxy_search(space, scorer, candidates=candidates, seed=seed, storage=storage)
    summary = summarise_proxy(study)
    complete = study.get_trials(deepcopy=False, states=_complete())
    if finetune_steps > 0:
        short = rescore_count(retrain, rescore)
        tuned = InheritedScorer.for_space(folder.net, space, device=device,
                                          finetune_steps=finetune_steps)
        complete = rescore_front(complete, tuned, k=short, steps=finetune_steps)
        seconds = sum(t.user_attrs["rescore_s"] for t in complete) / max(len(complete), 1)
        say(f"one-shot: re-scored {len(complete)} of the proxy front after {finetune_steps}"
            f" fine-tuning steps each ({seconds:.2f} s per candidate)")
    picks = select_for_retrain(complete, retrain)
    queued = enqueue_for_retrain(main_study, picks, proxy_study=study.study_name)
    say(f"one-shot: {summary.candidates} candidates, {summary.seconds_per_candidate:.3f} s per"
        f" scored candidate; {queued} of its front queued for stand-alone training")
    return OneShotPlan(proxy=summary, queued=queued,
                       picks=tuple(dict(t.user_attrs["arch"]) for t in picks))


def _complete() -> tuple:
    import optuna

    return (optuna.trial.TrialState.COMPLETE,)
