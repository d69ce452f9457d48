"""`spvit-nas train --arch PATH --out DIR`: train one architecture, e.g. an exported choice.

The recipe is `--training FILE` (a YAML `TrainingConfig`, or a search-space file whose `training:`
block is used; default: `TrainingConfig()`, and with `--resume` the folder's own `training.yaml`,
so a resumed run trains to the epochs it was started for), with `--dataset`, `--epochs` and
`--workers` on top.
The resolved recipe is saved as `DIR/training.yaml`; training goes through
`launch.trial.run_candidate`, so DIR is a trial folder (metrics.jsonl, checkpoint/, ds_config.json,
model.safetensors and arch.yaml at the end). A folder that already holds a checkpoint is only
continued with `--resume`, never overwritten; `--resume` on a folder without one is refused, and
so is an `--out` that is or lies inside a run folder, a search's trial or an export
(`nas.outputs`). The data, the batch split and the CPUs/GPUs asked for are checked before a file
is written or Ray starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True, metavar="PATH",
                        help="architecture YAML (e.g. an export's arch.yaml) or a registered"
                             " name such as spvit_test")
    parser.add_argument("--out", required=True, metavar="DIR", help="the training folder")
    parser.add_argument("--dataset", default=None, metavar="DATA",
                        help="digits | fashion-mnist[:PATH] | folder:PATH | cifar10:PATH |"
                             " cifar100:PATH (default: the recipe's)")
    parser.add_argument("--epochs", type=int, default=None, metavar="N",
                        help="training epochs (default: the recipe's; with --resume, the"
                             " folder's training.yaml)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="DeepSpeed workers (default: the recipe's workers_per_trial); one"
                             " trains in this process, several under Ray Train")
    parser.add_argument("--resume", action="store_true",
                        help="continue the checkpoint in --out (required if it holds one)")
    parser.add_argument("--training", default=None, metavar="FILE",
                        help="YAML training recipe, or a search-space file with a training:"
                             " block")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C",
                        help="CPUs (torch threads) per worker (default: 1)")
    parser.add_argument("--address", default=None, metavar="ADDR",
                        help="Ray cluster for several workers (default: a local instance)")


def load_training(path: str | None, *, what: str = "--training file") -> Any:
    """The `TrainingConfig` in `path`: a recipe mapping or a space file's `training:` block.
    `what` names the file in errors."""
    import yaml

    from search_spaces.training import TrainingConfig
    from spvit.errors import ConfigError

    if path is None:
        return TrainingConfig()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{what} {path!r} does not exist. Check the path.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {' '.join(str(e).split())}. Fix"
                          " the syntax.")\
            from None
    if isinstance(data, dict) and "training" in data:
        data = data["training"]
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of training fields (or a"
                          f" `training:` block), but got {type(data).__name__}. Write e.g."
                          " `epochs: 10`.")
    try:
        return TrainingConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def check_before_training(spec: Any, training: Any, *, workers: int, use_gpu: bool,
                          cpus_per_worker: float, address: str | None) -> None:
    """Everything `train` can check before Ray starts or a file is written: the data (present,
    class count, channels), the batch split, and the CPUs/GPUs asked for against this machine
    (a local instance) or the cluster's totals as far as they are known without joining it."""
    import math as _math

    from nas.data import check_compatible, describe_dataset
    from nas.ds_config import micro_batch_size
    from spvit.errors import ConfigError

    if isinstance(cpus_per_worker, bool) or not _math.isfinite(cpus_per_worker) \
            or cpus_per_worker <= 0:
        raise ConfigError(f"--cpus-per-worker must be > 0, but got {cpus_per_worker!r}. Pass"
                          " e.g. --cpus-per-worker 1.")
    micro_batch_size(training, workers)
    check_compatible(describe_dataset(training.dataset), spec)
    from .ray_env import resolve_address

    if address is None and resolve_address(None) is None:
        check_local_resources(workers=workers, cpus_per_worker=cpus_per_worker,
                              use_gpu=use_gpu, flag="--workers")


def check_local_resources(*, workers: int, cpus_per_worker: float, use_gpu: bool, flag: str,
                          num_cpus: int | None = None,
                          cpus_flag: str | None = "--cpus-per-worker") -> None:
    """Refuse a request this machine cannot hold (a local Ray instance would wait forever).
    `flag` and `cpus_flag` are the command's flags for the workers and their CPUs (None: the
    command has none for the CPUs)."""
    import os as _os

    from spvit.errors import ConfigError

    have_cpus = num_cpus if num_cpus is not None else (_os.cpu_count() or 1)
    need_cpus = workers * cpus_per_worker if workers > 1 else cpus_per_worker
    if workers > 1 and need_cpus > have_cpus:
        raise ConfigError(f"{flag} {workers} x {cpus_per_worker:g} CPU(s) needs {need_cpus:g}"
                          f" CPUs, but this machine has {have_cpus}; Ray would wait for them"
                          f" forever. Lower {flag}{f' or {cpus_flag}' if cpus_flag else ''}, or"
                          " join a cluster with --address.")
    if use_gpu:
        import torch

        have_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have_gpus < workers:
            raise ConfigError(f"{workers} worker(s) with one GPU each need {workers} GPU(s), but"
                              f" this machine has {have_gpus}. Drop the GPU request, lower the"
                              " workers, or join a GPU cluster with --address.")


def run(args: argparse.Namespace) -> int:
    from launch.flags import flags_named

    with flags_named():  # the settings `nas` names, as this command's flags
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import yaml
    from tqdm import tqdm

    from nas.layout import TrialFolder
    from nas.outputs import check_output
    from search_spaces.arch_refs import resolve_arch
    from spvit.errors import ConfigError
    from spvit.io import atomic_write_text

    from .trial import TrialFailed, run_candidate
    from .worker import check_resumable, read_checkpoint_state

    out = check_output(args.out, command="train", resume=args.resume)
    folder = TrialFolder(out)
    recipe = folder.training
    if args.resume and args.training is None and recipe.is_file():
        # A resume continues the folder's own recipe (its epochs included), not the default.
        training = load_training(str(recipe), what="--resume: the folder's recipe")
    else:
        training = load_training(args.training)
    changes: dict[str, Any] = {}
    if args.dataset is not None:
        changes["dataset"] = args.dataset
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    if args.workers is not None:
        changes["workers_per_trial"] = args.workers
    training = training.replace(**changes)  # validated again, e.g. batch vs workers
    spec = resolve_arch(args.arch)
    check_before_training(spec, training, workers=training.workers_per_trial,
                          use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                          address=args.address)

    state = read_checkpoint_state(out)
    if not args.resume and (folder.checkpoint.is_dir() and any(folder.checkpoint.iterdir())):
        done = f" (epoch {state.epoch})" if state else ""
        raise ConfigError(f"--out {out} already holds a checkpoint{done}. Pass --resume to"
                          " continue it, or choose another --out.")
    if args.resume and state is None:
        raise ConfigError(f"--resume: {out} holds no checkpoint to resume (no"
                          f" {folder.checkpoint_state.relative_to(out)}). Drop --resume to train"
                          " from scratch, or pass the folder an earlier `spvit-nas train` wrote.")
    if args.resume:
        if args.training is None and not recipe.is_file() and args.epochs is None:
            # No recipe file (e.g. removed): the checkpoint's recipe keeps its target.
            training = training.replace(epochs=state.training.get("epochs", training.epochs))
        check_resumable(state, spec, training, training.workers_per_trial)
    if args.resume and state.epoch >= training.epochs:
        print(f"{out} is already trained for {state.epoch} epochs (of {training.epochs});"
              " writing its weights again.", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(recipe, yaml.safe_dump(training.to_dict(), sort_keys=False))

    start = state.epoch if (args.resume and state) else 0
    bar = tqdm(total=training.epochs, initial=min(start, training.epochs), unit="epoch",
               desc="train", dynamic_ncols=True, file=sys.stderr)

    def on_epoch(metrics: dict[str, Any]) -> None:
        bar.update(max(0, metrics["epoch"] - bar.n))
        bar.set_postfix(val_acc=f"{metrics['val_acc']:.4f}", loss=f"{metrics['train_loss']:.3f}",
                        img_s=f"{metrics['images_per_s']:.0f}")

    try:
        final = run_candidate(spec, training, out, workers=training.workers_per_trial,
                              use_gpu=args.use_gpu, resume=args.resume, on_epoch=on_epoch,
                              cpus_per_worker=args.cpus_per_worker, ray_address=args.address)
    except TrialFailed as e:
        bar.close()
        print(f"spvit-nas train: training failed: {e.reason} (see {folder.failure})",
              file=sys.stderr)
        return 1
    finally:
        bar.close()  # before any message, so that it never lands inside the bar's line
    print(f"trained {out}: epoch {final['epoch']}/{training.epochs}, val_acc"
          f" {final['val_acc']:.4f}, val_acc5 {final['val_acc5']:.4f}, val_loss"
          f" {final['val_loss']:.4f}; weights in {out / 'model.safetensors'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from launch.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
