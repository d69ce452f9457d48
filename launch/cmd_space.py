"""`spvit-nas cost` and `spvit-nas check-space`: price one architecture, validate a space file.

Both are analytic (no model build): `cost` prints an `ArchSpec`'s parameters and GMACs from
`spvit.cost`; `check-space` loads a search-space file through `SearchSpace.load` (every rule
checked there), checks that its dataset exists and fits it (`nas.data.describe_dataset`: folder
listings and metadata files only), then prints its dimensions, its size and the cost range of
random samples.
Bad input raises `ConfigError`, which the CLI turns into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math

from spvit.errors import ConfigError


# ---------------------------------------------------------------------------- cost
def add_cost_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True, metavar="PATH",
                        help="architecture YAML (an arch.yaml, nested or flat form), or the name"
                             " of a reference in search_spaces/archs/ such as deit_small")
    parser.add_argument("--img-size", type=int, default=None, metavar="N",
                        help="price the architecture at this input size instead of its own")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (params, gflops, macs, parts)")


# The fields that set an architecture's size and have no default a reader could guess: pricing
# a file without them would price numbers its author never wrote (e.g. ArchSpec's width 192).
COST_REQUIRED = ("img_size", "patch_size", "embed_dim", "num_classes")


def _check_required_fields(value: str) -> None:
    """`ConfigError` naming the fields of COST_REQUIRED that the --arch file leaves out."""
    import yaml

    from search_spaces.arch_refs import arch_path

    path = arch_path(value)
    if path is None:  # a registered model: complete by construction
        return
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    missing = [k for k in COST_REQUIRED if k not in data]
    if missing:
        import dataclasses

        from spvit.arch import ArchSpec

        defaults = {f.name: f.default for f in dataclasses.fields(ArchSpec)}
        guessed = ", ".join(f"{k} {defaults[k]}" for k in missing)
        raise ConfigError(f"{path} does not set {', '.join(missing)}, on which the cost depends;"
                          f" pricing it would price defaults its author never wrote ({guessed})."
                          f" Add {', '.join(f'{k}: N' for k in missing)} to the file.")


def run_cost(args: argparse.Namespace) -> int:
    from search_spaces.arch_refs import resolve_arch
    from spvit.cost import estimate

    spec = resolve_arch(args.arch)  # a readable, valid architecture first
    _check_required_fields(args.arch)
    if args.img_size is not None:
        if args.img_size < 1:
            raise ConfigError(f"--img-size must be a positive integer, but got {args.img_size}."
                              " Pass e.g. --img-size 224.")
        try:
            spec = spec.replace(img_size=args.img_size)
        except ConfigError as e:
            raise ConfigError(f"--img-size {args.img_size}: {e}") from None
    cost = estimate(spec)
    if args.json:
        print(json.dumps(cost.to_dict()))
        return 0
    print(f"architecture: {args.arch} (depth {spec.depth}, width {spec.embed_dim},"
          f" {spec.img_size} px, patch {spec.patch_size})")
    print(f"params: {cost.params:,} ({cost.params / 1e6:.2f} M)")
    print(f"gflops: {cost.gflops:.4f} (GMACs of one image's forward pass)")
    width = max(len(p.name) for p in cost.parts)
    for part in cost.parts:
        print(f"  {part.name:<{width}}  params {part.params:>12,}  gmacs {part.macs / 1e9:10.5f}")
    return 0


# ---------------------------------------------------------------------------- check-space
def add_check_space_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="search-space YAML file")
    parser.add_argument("--samples", type=int, default=200, metavar="N",
                        help="random samples used for the cost range (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of those samples (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _quantiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"min": values[0], "median": values[len(values) // 2], "max": values[-1]}


def _check_dataset(space, path: str):
    """The space's dataset (`nas.data.DatasetInfo`): it exists and fits the space's fixed
    classes, channels and image size, as a search would check before starting. Reads only
    folder listings and metadata files."""
    from pathlib import Path
    from types import SimpleNamespace

    from nas.data import check_compatible, describe_dataset
    from search_spaces.training import parse_dataset

    fixed = space.fixed
    dataset = space.training.dataset
    kind, root = parse_dataset(dataset)
    if root is not None and not Path(root).expanduser().exists():
        raise ConfigError(f"{path}: training.dataset {dataset!r} names the folder"
                          f" {str(Path(root).expanduser())!r}, which does not exist. Point it at"
                          f" the data's folder (dataset: {kind}:PATH), or fix the path.")
    try:
        info = describe_dataset(dataset)
        check_compatible(info, SimpleNamespace(num_classes=fixed["num_classes"],
                                               in_chans=fixed["in_chans"],
                                               img_size=fixed["img_size"]))
    except ConfigError as e:
        raise ConfigError(f"{path}: training.dataset {dataset!r}: {e}") from None
    return info


def run_check_space(args: argparse.Namespace) -> int:
    import random

    from search_spaces.space import SearchSpace
    from spvit.cost import estimate

    if args.samples < 1:
        raise ConfigError(f"--samples must be >= 1, but got {args.samples}. Pass e.g."
                          " --samples 200.")
    space = SearchSpace.load(args.path)
    dataset = _check_dataset(space, args.path)
    rng = random.Random(args.seed)
    params, gflops, feasible = [], [], 0
    for _ in range(args.samples):
        spec = space.sample(rng)
        cost = estimate(spec)
        params.append(cost.params)
        gflops.append(cost.gflops)
        feasible += not space.constraints.violations(spec, cost)
    size = space.size()
    summary = {
        "name": space.name,
        "size": size,
        "dimensions": [{"name": d.name, "choices": [list(c) if isinstance(c, tuple) else c
                                                    for c in d.choices],
                        "scope": d.scope, "note": d.note} for d in space.dimensions()],
        "fixed": dict(space.fixed),
        "samples": args.samples,
        "feasible_fraction": feasible / args.samples,
        "params": _quantiles(params),
        "gflops": _quantiles(gflops),
        "constraints": space.constraints.to_dict(),
        "training": space.training.to_dict(),
        "dataset": {"kind": dataset.kind, "root": dataset.root,
                    "num_classes": dataset.num_classes},
        "search": space.search.to_dict(),
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"space {space.name!r} ({args.path}): valid")
    print(f"size: {size:,} architectures (10^{math.log10(size):.1f})")
    print("dimensions:")
    for d in summary["dimensions"]:
        note = f"  [{d['note']}]" if d["note"] else ""
        print(f"  {d['name']:<14} {d['scope']:<6} {d['choices']}{note}")
    fixed = ", ".join(f"{k}={v}" for k, v in space.fixed.items())
    print(f"fixed: {fixed}")
    p, g = summary["params"], summary["gflops"]
    print(f"cost of {args.samples} random samples (seed {args.seed}):")
    print(f"  params  min {p['min']:,.0f}  median {p['median']:,.0f}  max {p['max']:,.0f}")
    print(f"  gflops  min {g['min']:.4g}  median {g['median']:.4g}  max {g['max']:.4g}")
    print(f"  feasible under constraints {space.constraints.to_dict()}:"
          f" {feasible}/{args.samples}")
    t = space.training
    where = f" (found: {dataset.root}, {dataset.num_classes} classes)" if dataset.root else ""
    print(f"training: dataset {t.dataset}{where}, {t.epochs} epochs, batch {t.batch_size},"
          f" lr {t.lr:g}")
    s = space.search
    print(f"search: {s.trials} trials, {s.concurrent} concurrent, sampler {s.sampler},"
          f" seed {s.seed}")
    return 0
