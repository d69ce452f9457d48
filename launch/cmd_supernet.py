"""`spvit-nas supernet train|score`: train a weight-sharing supernet over a search space, and
score one architecture with its inherited weights.

* `supernet train --space PATH --out DIR [--epochs N] [--train-subset N|all] [--workers W]
  [--resume]`: the sandwich rule with in-place distillation under DeepSpeed (`launch.supernet`);
  a progress bar per epoch shows the largest and smallest subnets' validation accuracy, also in
  `DIR/metrics.jsonl`. `--train-subset all` trains on the whole training split where the space's
  recipe keeps a subset for its stand-alone trainings (one supernet costs a few of those).
* `supernet score --supernet DIR --arch ARCH.yaml [--finetune-steps S] [--json]`: the
  inherited-weight validation accuracy of one architecture (evaluation only; with S > 0 after S
  fine-tuning steps of a copy of the subnet). An architecture outside the supernet's space,
  or a folder that is not a trained supernet, exits 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="supernet_command", metavar="ACTION",
                                parser_class=type(parser))
    sub.required = True
    train = sub.add_parser("train", help="train a supernet over a search space")
    train.add_argument("--space", required=True, type=Path, metavar="PATH",
                       help="search-space YAML (its training: block is the recipe)")
    train.add_argument("--out", required=True, type=Path, metavar="DIR",
                       help="the supernet folder")
    train.add_argument("--epochs", type=int, default=None, metavar="N",
                       help="training epochs (default: the space's training.epochs; with"
                            " --resume, the epochs the folder was started for)")
    train.add_argument("--train-subset", default=None, metavar="N|all",
                       help="images of the training split to train on: a stratified subset of"
                            " N, or all of them (default: the space's training.train_subset)")
    train.add_argument("--workers", type=int, default=1, metavar="W",
                       help="DeepSpeed data-parallel workers (1: in this process; more: Ray"
                            " Train)")
    train.add_argument("--random-subnets", type=int, default=2, metavar="R",
                       help="random feasible subnets per step besides the largest and the"
                            " smallest (default 2)")
    train.add_argument("--label-epochs", type=int, default=0, metavar="E",
                       help="epochs in which every subnet learns from the labels before"
                            " in-place distillation starts (default 0)")
    train.add_argument("--resume", action="store_true",
                       help="continue the checkpoint in --out (required if it holds one)")
    train.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    train.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C",
                       help="CPUs (torch threads) per worker (default: 1)")
    train.add_argument("--address", default=None, metavar="ADDR",
                       help="Ray cluster for several workers (default: a local instance)")
    score = sub.add_parser("score", help="inherited-weight accuracy of one architecture")
    score.add_argument("--supernet", required=True, type=Path, metavar="DIR",
                       help="a folder written by `spvit-nas supernet train`")
    score.add_argument("--arch", required=True, metavar="ARCH.yaml",
                       help="the architecture (nested or flat YAML)")
    score.add_argument("--finetune-steps", type=int, default=0, metavar="S",
                       help="fine-tuning steps from the inherited weights before scoring"
                            " (default 0: the inherited weights as they are)")
    score.add_argument("--json", action="store_true", help="print one JSON object")
    score.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from tqdm import tqdm

    from search_spaces.space import SearchSpace

    from .supernet import target_epochs, train_supernet

    space = SearchSpace.load(args.space)
    epochs = args.epochs
    if epochs is None and args.resume and Path(args.out).is_dir():
        epochs = target_epochs(args.out)  # a resume trains to the folder's target, not the file's
    if epochs is not None:
        space = dataclasses.replace(space, training=space.training.replace(epochs=epochs))
    if args.train_subset is not None:
        space = dataclasses.replace(space, training=space.training.replace(
            train_subset=_train_subset(args.train_subset)))
    bars: list[Any] = []

    def on_start(first_epoch: int) -> None:
        bars.append(tqdm(total=space.training.epochs,
                         initial=min(first_epoch - 1, space.training.epochs), unit="epoch",
                         desc="supernet", dynamic_ncols=True, file=sys.stderr))

    def on_epoch(line: dict[str, Any]) -> None:
        bar = bars[0]
        bar.update(max(0, line["epoch"] - bar.n))
        bar.set_postfix(largest=f"{line['val_acc_largest']:.3f}",
                        smallest=f"{line['val_acc_smallest']:.3f}",
                        loss=f"{line['train_loss']:.3f}")

    try:
        last = train_supernet(space, args.out, workers=args.workers, resume=args.resume,
                              use_gpu=args.use_gpu, random_subnets=args.random_subnets,
                              label_epochs=args.label_epochs,
                              cpus_per_worker=args.cpus_per_worker, ray_address=args.address,
                              on_epoch=on_epoch, on_start=on_start)
    finally:
        for bar in bars:
            bar.close()
    if last is None:
        print(f"{args.out}: nothing to train (0 epochs)")
        return 0
    print(f"trained supernet {args.out}: epoch {last['epoch']}/{space.training.epochs},"
          f" largest val_acc {last['val_acc_largest']:.4f}, smallest val_acc"
          f" {last['val_acc_smallest']:.4f}")
    return 0


def _train_subset(text: str) -> int | None:
    """`--train-subset`: None for `all`, else the whole number (the recipe checks its range)."""
    from spvit.errors import ConfigError

    if text.strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--train-subset must be a number of images or 'all', but got"
                          f" {text!r}. Use e.g. --train-subset 10000 or --train-subset all.")\
            from None


def _score_device(name: str) -> str:
    """`--device` if this machine has it, else `ConfigError` naming it and what it has."""
    import torch

    from spvit.errors import ConfigError

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device {name!r} is not a torch device. Use cpu, cuda or cuda:N.")\
            from None
    if device.type == "cpu":
        return name
    if device.type != "cuda":
        raise ConfigError(f"--device {name!r} ({device.type}) is not supported for scoring. Use"
                          " cpu, cuda or cuda:N.")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"--device {name!r} needs a CUDA GPU, but torch sees none on this"
                          " machine. Use --device cpu, or run on a machine with a GPU.")
    if device.index is not None and device.index >= count:
        raise ConfigError(f"--device {name!r} names GPU {device.index}, but this machine has"
                          f" {count} (cuda:0..cuda:{count - 1}). Use one of them.")
    return name


def _score(args: argparse.Namespace) -> int:
    from nas.oneshot import InheritedScorer, open_supernet
    from search_spaces.arch_refs import resolve_arch  # files, references, registered names
    from spvit.cost import estimate
    from spvit.errors import ConfigError

    _score_device(args.device)
    folder = open_supernet(args.supernet, device=args.device)
    spec = resolve_arch(args.arch)
    why = folder.why_not(spec)
    if why is not None:
        raise ConfigError(f"{args.arch} is outside the space of supernet {args.supernet}:"
                          f" {why}. Score a member of space {folder.space.name!r}.")
    scorer = InheritedScorer.for_space(folder.net, folder.space, device=args.device,
                                       finetune_steps=args.finetune_steps)
    result = scorer(spec)
    cost = estimate(spec)
    out = {"val_acc": result["val_acc"], "val_acc5": result["val_acc5"],
           "val_loss": result["val_loss"], "images": result["images"],
           "seconds": round(result["seconds"], 4), "gflops": cost.gflops, "params": cost.params,
           "feasible": not folder.space.constraints.violations(spec, cost),
           "finetune_steps": args.finetune_steps,
           "supernet_epochs": folder.epochs, "arch": spec.to_flat()}
    if args.json:
        print(json.dumps(out))
    else:
        how = (f"{args.finetune_steps} fine-tuning steps from inherited weights"
               if args.finetune_steps else "inherited weights")
        print(f"val_acc {out['val_acc']:.4f} ({how}, supernet epoch"
              f" {folder.epochs}, {out['images']} images, {out['seconds']:.2f} s)")
    return 0


def run(args: argparse.Namespace) -> int:
    from launch.flags import flags_named

    with flags_named():  # the settings `nas` names, as this command's flags
        return _train(args) if args.supernet_command == "train" else _score(args)


if __name__ == "__main__":  # pragma: no cover
    from launch.cli import main

    sys.exit(main(["supernet", *sys.argv[1:]]))
