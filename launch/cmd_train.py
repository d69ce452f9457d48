"""`spvit-nas train --arch PATH --out DIR`: train one architecture, e.g. an exported choice.

The recipe is `--training FILE` (a YAML `TrainingConfig`, or a search-space file whose `training:`
block is used; default: `TrainingConfig()`), with `--dataset`, `--epochs` and `--workers` on top.
The resolved recipe is saved as `DIR/training.yaml`; training goes through
`launch.trial.run_candidate`, so DIR is a trial folder (metrics.jsonl, checkpoint/, ds_config.json,
model.safetensors and arch.yaml at the end). A folder that already holds a checkpoint is only
continued with `--resume`, never overwritten.
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
                        help="digits | folder:PATH | cifar10:PATH | cifar100:PATH"
                             " (default: the recipe's)")
    parser.add_argument("--epochs", type=int, default=None, metavar="N",
                        help="training epochs (default: the recipe's)")
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


def load_training(path: str | None) -> Any:
    """The `TrainingConfig` in `path`: a recipe mapping or a space file's `training:` block."""
    import yaml

    from search_spaces.training import TrainingConfig
    from spvit.errors import ConfigError

    if path is None:
        return TrainingConfig()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"--training file {path!r} does not exist. Check the path.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--training file {path} is not valid YAML: {e}. Fix the syntax.")\
            from None
    if isinstance(data, dict) and "training" in data:
        data = data["training"]
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"--training file {path} must hold a mapping of training fields (or a"
                          f" `training:` block), but got {type(data).__name__}. Write e.g."
                          " `epochs: 10`.")
    try:
        return TrainingConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def run(args: argparse.Namespace) -> int:
    import yaml
    from tqdm import tqdm

    from search_spaces.arch_refs import resolve_arch
    from spvit.errors import ConfigError
    from spvit.io import atomic_write_text

    from .trial import TrialFailed, run_candidate
    from .worker import CHECKPOINT_DIR, read_checkpoint_state

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
    out = Path(args.out)

    state = read_checkpoint_state(out)
    if not args.resume and ((out / CHECKPOINT_DIR).is_dir()
                            and any((out / CHECKPOINT_DIR).iterdir())):
        done = f" (epoch {state.epoch})" if state else ""
        raise ConfigError(f"--out {out} already holds a checkpoint{done}. Pass --resume to"
                          " continue it, or choose another --out.")
    if args.resume and state is not None and state.epoch >= training.epochs:
        print(f"{out} is already trained for {state.epoch} epochs (of {training.epochs});"
              " writing its weights again.", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "training.yaml",
                      yaml.safe_dump(training.to_dict(), sort_keys=False))

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
        print(f"spvit-nas train: training failed: {e.reason} (see {out / 'failure.json'})",
              file=sys.stderr)
        return 1
    bar.close()
    print(f"trained {out}: epoch {final['epoch']}/{training.epochs}, val_acc"
          f" {final['val_acc']:.4f}, val_acc5 {final['val_acc5']:.4f}, val_loss"
          f" {final['val_loss']:.4f}; weights in {out / 'model.safetensors'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from launch.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
