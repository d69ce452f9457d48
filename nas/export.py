"""Export of one searched architecture with its trained weights, ready to use outside the search.

`export_trial(run_dir, trial_number, out_dir)` turns a full-fidelity trial of a run into a folder:

* `arch.yaml`          the trial's `ArchSpec` (nested YAML; `spvit.create_model` and
                       `spvit-nas train --arch` read it);
* `model.safetensors`  the trained fp32 weights, copied from the trial's consolidated file after
                       checking that they load into `spvit.create_model(arch)` and are finite;
* `model.onnx`         the model in eval mode, opset 17, input `image` (B, C, H, W) float32,
                       output `logits` (B, num_classes), batch axis dynamic; exported with the
                       TorchScript-based exporter (`torch.onnx.export(dynamo=False)`: the dynamo
                       exporter needs the `onnxscript` package) and verified against torch with
                       onnxruntime at two batch sizes;
* `config.json`        the Hugging Face Hub / timm model config: `architecture` (`spvit`),
                       `num_classes`, `num_features`, `global_pool`, `model_args` (`arch`: the
                       nested ArchSpec) and `pretrained_cfg` with the input size, interpolation,
                       crop and the mean/std the search trained with (`training_preprocessing`),
                       so that `timm.create_model("local-dir:DIR", pretrained=True)` (after
                       `import spvit`) rebuilds the model with its weights and
                       `timm.data.resolve_data_config(model=...)` gives the training's inputs;
* `training.yaml`      the search's training recipe (`TrainingConfig`, epochs = the trial's budget;
                       a dataset path is reduced to its folder name);
* `README.md`          a model card with the Hub's YAML front matter (`library_name: timm`, tags,
                       dataset, metrics with validation and, when the trial recorded `test_acc`,
                       test accuracy): metrics, cost, dataset, budget, architecture, how to load
                       it (timm, spvit, onnxruntime) and how to retrain it.

Nothing exported holds an absolute path: the card names files relative to the folder.

Everything is written into a hidden temporary folder next to `out_dir`, which is renamed to
`out_dir` only when complete, so a killed export never leaves half a folder. Trials that cannot
be exported (unknown number, failed, pruned, below the full budget, infeasible, missing or
corrupt weights) raise `ConfigError` with one line (the CLI exits 2). No Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from optuna.trial import FrozenTrial

from nas import outputs, pareto, run
from nas.layout import (
    ARCH_FILE,
    CONFIG_FILE,
    ONNX_FILE,
    TRAINING_FILE,
    WEIGHTS_FILE,
    ExportFolder,
)
from nas.run import (  # noqa: F401  (the trial-model readers live in nas.run)
    build_with_weights,
    check_exportable,
    find_trial,
    load_trial_model,
    load_weights,
    trial_spec,
)
from nas.settings import SettingError
from spvit.arch import ArchSpec
from spvit.errors import ConfigError
from spvit.io import atomic_write_json, atomic_write_text

ONNX_OPSET = 17
ONNX_INPUT = "image"
ONNX_OUTPUT = "logits"
ONNX_ATOL = 1e-4
EXPORT_FILES = ExportFolder.FILES  # what an export holds besides its marker


# ---------------------------------------------------------------------------- ONNX
def export_onnx(model, spec: ArchSpec, path: str | os.PathLike, *,
                opset: int = ONNX_OPSET) -> float:
    """Write `model` to ONNX (dynamic batch), check it against torch at batch 1 and 3 and
    return the largest absolute difference of the logits."""
    import torch

    model = model.eval()
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(1, spec.in_chans, spec.img_size, spec.img_size, generator=gen)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter announces its own deprecation and warns about traced Python
        # booleans (shape checks); neither affects a fixed-resolution, dynamic-batch export.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}})
    return verify_onnx(model, spec, path, batch_sizes=(1, 3))


def verify_onnx(model, spec: ArchSpec, path: str | os.PathLike, *,
                batch_sizes: tuple[int, ...] = (1, 3), atol: float = ONNX_ATOL) -> float:
    """Max |onnxruntime - torch| over random inputs at `batch_sizes`; raises if above `atol`."""
    import onnx
    import onnxruntime as ort
    import torch

    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for b in batch_sizes:
        x = torch.randn(b, spec.in_chans, spec.img_size, spec.img_size, generator=gen)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy()})[0]
        if got.shape != expected.shape:
            raise RuntimeError(f"ONNX output shape {got.shape} != torch {expected.shape} at"
                               f" batch {b}")
        worst = max(worst, float(np.abs(got - expected).max()))
    if not worst <= atol:
        raise RuntimeError(f"ONNX export disagrees with torch by {worst:.3g} (> {atol}); the"
                           " model uses an operation the TorchScript exporter traces wrongly.")
    return worst


# ---------------------------------------------------------------------------- model card
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def trial_training(run_dir: Path, info: dict[str, Any], budget: Any = None):
    """The search's `TrainingConfig` (`nas.run.training_config`; defaults where the run recorded
    none, as the search itself did), with `epochs` set to the trial's `budget`."""
    from search_spaces.fields import is_whole
    from search_spaces.training import TrainingConfig

    config = run.training_config(run_dir, info) or TrainingConfig()
    if is_whole(budget, 1):
        config = dataclasses.replace(config, epochs=budget)
    return config


def training_preprocessing(training, spec: ArchSpec) -> dict[str, Any]:
    """How the search fed images to `spec` in training (`nas.data`'s validation transform), as
    timm data-config fields: `mean`, `std` (tuples, one entry per input channel),
    `interpolation`, `crop_pct`, `crop_mode`.

    * digits: 8x8 scans upsampled bilinearly to `img_size`, normalised with the training
      split's pixel mean / std (computed by `nas.data.build_datasets`, so the numbers are the
      training's own);
    * fashion-mnist: bilinear resize to `img_size`, Fashion-MNIST's pixel statistics;
    * cifar10 / cifar100: bilinear resize to `img_size`, the CIFAR channel statistics;
    * folder: timm's eval transform (bilinear, crop 0.875) with ImageNet statistics (their
      average for one channel).
    """
    from timm.data import DEFAULT_CROP_PCT

    from nas import data
    from search_spaces.training import parse_dataset

    kind, _ = parse_dataset(training.dataset)
    crop_pct = 1.0  # tensor datasets are resized whole, never cropped
    if kind == "digits":
        # The statistics do not depend on the class count; the digits have 10 classes.
        datasets = data.build_datasets(dataclasses.replace(training, augment=False),
                                       spec.replace(num_classes=10))
        mean, std = tuple(datasets.mean), tuple(datasets.std)
    elif kind == "fashion-mnist":
        mean = data.FASHION_MNIST_MEAN * spec.in_chans
        std = data.FASHION_MNIST_STD * spec.in_chans
    elif kind in ("cifar10", "cifar100"):
        mean, std = {"cifar10": (data.CIFAR10_MEAN, data.CIFAR10_STD),
                     "cifar100": (data.CIFAR100_MEAN, data.CIFAR100_STD)}[kind]
    else:
        mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
        if spec.in_chans == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        crop_pct = DEFAULT_CROP_PCT
    return dict(mean=tuple(float(m) for m in mean), std=tuple(float(v) for v in std),
                interpolation="bilinear", crop_pct=crop_pct, crop_mode="center")


def _portable_dataset(dataset: str) -> str:
    """The dataset string without the machine's path: `kind:<folder name>`."""
    kind, _, path = dataset.partition(":")
    return f"{kind}:{Path(path).name}" if path else kind


def _json_ready(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return value


def hub_config(spec: ArchSpec, preprocessing: dict[str, Any], *,
               label_names: list[str] | None = None) -> dict[str, Any]:
    """The `config.json` that timm's `local-dir:` / `hf-hub:` loaders read."""
    from spvit import pretrained_cfg_for

    cfg = pretrained_cfg_for(spec, **preprocessing)
    cfg.pop("architecture", None)
    config = {
        "architecture": "spvit",
        "num_classes": spec.num_classes,
        "num_features": spec.num_features,
        "global_pool": "token" if spec.head == "cls" else "avg",
        "model_args": {"arch": spec.to_dict()},
        "pretrained_cfg": cfg,
    }
    if label_names and len(label_names) == spec.num_classes:
        config["label_names"] = list(label_names)
    return _json_ready(config)


def _label_names(training) -> list[str] | None:
    from nas import data

    try:
        return list(data.describe_dataset(training.dataset).class_names)
    except ConfigError:  # the data is not on this machine: the config simply has no names
        return None


def _front_matter(*, name: str, dataset_kind: str, val_acc: float,
                  test_acc: float | None) -> str:
    results = [{"task": {"type": "image-classification", "name": "Image Classification"},
                "dataset": {"name": dataset_kind, "type": dataset_kind, "split": "validation"},
                "metrics": [{"type": "accuracy", "value": round(100 * val_acc, 2),
                             "name": "validation top-1 accuracy"}]}]
    if test_acc is not None:
        results.append({"task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {"name": dataset_kind, "type": dataset_kind, "split": "test"},
                        "metrics": [{"type": "accuracy", "value": round(100 * test_acc, 2),
                                     "name": "test top-1 accuracy"}]})
    meta = {
        "library_name": "timm",
        "license": "apache-2.0",
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "timm", "spvit", "vision-transformer",
                 "neural-architecture-search"],
        "datasets": [dataset_kind],
        "metrics": ["accuracy"],
        "model-index": [{"name": name, "results": results}],
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def model_card(*, run_dir: Path, info: dict[str, Any], study_name: str, trial: FrozenTrial,
               spec: ArchSpec, out_dir: Path, weights_sha256: str, onnx_error: float,
               training=None, preprocessing: dict[str, Any] | None = None) -> str:
    """The README.md of an export (Hub front matter + card); file names relative to it."""
    acc, gflops, params = trial.values
    attrs = trial.user_attrs
    metrics = run.trial_metrics(run_dir, trial)
    last = metrics[-1] if metrics else {}
    if training is None:
        training = trial_training(run_dir, info, attrs.get("budget"))
    if preprocessing is None:
        preprocessing = training_preprocessing(training, spec)
    dataset = _portable_dataset(training.dataset)
    kind = dataset.partition(":")[0]
    test_acc = _number(attrs.get("test_acc"))
    name = f"spvit-{study_name}-trial{trial.number}"
    folder = out_dir.name

    def metric(key: str, fmt: str) -> str:
        v = last.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    block_rows = []
    has_cls = spec.block_has_cls()
    for i, (b, side, width) in enumerate(zip(spec.blocks, spec.block_grids(),
                                             spec.block_widths(), strict=True)):
        prior = b.prior if isinstance(b.prior, str) else ", ".join(b.prior)
        block_rows.append(f"| {i} | {side}x{side}{' + CLS' if has_cls[i] else ''} | {width} |"
                          f" {b.heads} | {prior} | {'yes' if b.share else ''} |"
                          f" {'yes' if b.pool else ''} |")
    recipe = ", ".join(f"{k} {getattr(training, k)}" for k in (
        "epochs", "batch_size", "lr", "min_lr", "warmup_epochs", "weight_decay",
        "label_smoothing", "zero_stage", "bf16", "workers_per_trial", "augment", "seed"))
    mean = ", ".join(f"{m:.4f}" for m in preprocessing["mean"])
    std = ", ".join(f"{v:.4f}" for v in preprocessing["std"])
    test_row = ([f"| test top-1 accuracy | {100 * test_acc:.2f}% |"] if test_acc is not None
                else [])
    retrain_dataset = ("" if kind == "digits" or dataset == "fashion-mnist" else
                       f" --dataset {kind}:PATH/TO/{dataset.partition(':')[2]}")
    lines = [
        _front_matter(name=name, dataset_kind=kind, val_acc=acc, test_acc=test_acc),
        f"# {name}: SP-ViT trial {trial.number} of search `{study_name}`",
        "",
        "A vision transformer from the SP-ViT family (spatial-prior attention, token pooling,"
        " attention sharing, structured attention initialisation) found by a multi-objective"
        " search over accuracy, GFLOPs and parameters.",
        "",
        "## Metrics",
        "| metric | value |",
        "|---|---:|",
        f"| validation top-1 accuracy | {100 * acc:.2f}% |",
        *test_row,
        f"| validation top-5 accuracy | {metric('val_acc5', '.4f')} |",
        f"| validation loss | {metric('val_loss', '.4f')} |",
        f"| GFLOPs (GMACs per image, {spec.img_size}x{spec.img_size}) | {gflops:.4g} |",
        f"| parameters | {int(params):,} |",
        f"| epochs trained / budget | {attrs.get('fidelity')} / {attrs.get('budget')} |",
        f"| training wall time | {attrs.get('wall_s', '-')} s |",
        "",
        "## Data and training",
        f"- dataset: `{dataset}` ({spec.num_classes} classes, {spec.in_chans}-channel"
        f" {spec.img_size}x{spec.img_size} inputs)",
        f"- preprocessing (as in training, also in `{CONFIG_FILE}`): resize"
        f" ({preprocessing['interpolation']}, crop_pct {preprocessing['crop_pct']:g}) to"
        f" {spec.img_size}x{spec.img_size}, pixels in [0, 1] normalised with mean ({mean}) and"
        f" std ({std})",
        f"- training recipe (`{TRAINING_FILE}`): {recipe}",
        f"- search: study `{study_name}`, trial {trial.number}"
        f" (run folder `{Path(run_dir).name}`, trial folder `{attrs.get('trial_dir', '-')}`)",
        "",
        "## Architecture",
        f"- depth {spec.depth}, embed_dim {spec.embed_dim}, mlp_ratio {spec.mlp_ratio:g},"
        f" patch {spec.patch_size} ({spec.stem} stem), head {spec.head}"
        + (f" (CLS joins at block {spec.cls_block})" if spec.head == "cls" else "")
        + f", pos_embed {spec.pos_embed}, conv_pos {spec.conv_pos}, init {spec.init},"
        f" pool_width_factor {spec.pool_width_factor}",
        f"- priors: {pareto.priors_summary(spec)}",
        "",
        "| block | tokens | width | heads | prior | shares attention | pools first |",
        "|---:|---|---:|---:|---|---|---|",
        *block_rows,
        "",
        "## Files",
        f"- `{CONFIG_FILE}`: timm / Hugging Face Hub config (architecture, model_args,"
        " pretrained_cfg with the training's preprocessing).",
        f"- `{ARCH_FILE}`: the architecture (`spvit.ArchSpec`).",
        f"- `{WEIGHTS_FILE}`: trained fp32 weights, sha256 `{weights_sha256}`.",
        f"- `{ONNX_FILE}`: ONNX opset {ONNX_OPSET}, input `{ONNX_INPUT}` float32"
        f" (batch, {spec.in_chans}, {spec.img_size}, {spec.img_size}), output `{ONNX_OUTPUT}`"
        f" (batch, {spec.num_classes}); batch axis dynamic; max |onnxruntime - torch| on random"
        f" inputs {onnx_error:.2g}.",
        f"- `{TRAINING_FILE}`: the training recipe of the search.",
        "",
        "## Use",
        f"Paths below are relative to the folder that holds this export (`{folder}`).",
        "",
        "With timm (importing spvit registers the `spvit` architecture):",
        "```python",
        "import timm",
        "import spvit  # noqa: F401",
        "",
        f'model = timm.create_model("local-dir:{folder}", pretrained=True).eval()',
        "config = timm.data.resolve_data_config(model=model)  # the training's mean / std",
        "transform = timm.data.create_transform(**config)",
        "```",
        "With spvit:",
        "```python",
        "import spvit",
        "from safetensors.torch import load_file",
        "",
        f'model = spvit.create_model("{folder}/{ARCH_FILE}")',
        f'model.load_state_dict(load_file("{folder}/{WEIGHTS_FILE}"))',
        "model.eval()",
        "```",
        "With onnxruntime:",
        "```python",
        "import onnxruntime as ort",
        "",
        f'session = ort.InferenceSession("{folder}/{ONNX_FILE}")',
        f'logits = session.run(["{ONNX_OUTPUT}"], {{"{ONNX_INPUT}": images}})[0]'
        "  # images: float32 numpy, normalised as above",
        "```",
        "",
        "## Retrain",
        "The search's recipe, from inside this folder"
        + (":" if not retrain_dataset else " (point --dataset at your copy of the data):"),
        "```",
        f"spvit-nas train --arch {ARCH_FILE} --training {TRAINING_FILE}{retrain_dataset}"
        " --out retrain",
        "```",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- export
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_temps(out_dir: Path) -> None:
    """Remove temp folders of earlier exports to `out_dir` whose process has died."""
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def export_trial(run_dir: str | os.PathLike, trial_number: int, out_dir: str | os.PathLike, *,
                 overwrite: bool = False, storage: str | None = None) -> Path:
    """Export trial `trial_number` of the run at `run_dir` into `out_dir` (see module docstring).

    `out_dir` must not exist (or be empty) unless `overwrite`; it is replaced in one rename.
    `storage` overrides the study storage URL recorded in run.json. Returns `out_dir`.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir)
    outputs.check_output(out_dir, command="export", overwrite=overwrite)
    info = pareto.read_run_info(run_dir)
    study = pareto.open_study(run_dir, storage=storage)
    trial = find_trial(study, trial_number)
    check_exportable(trial)
    if out_dir.exists() and not out_dir.is_dir():
        raise SettingError("out", f"`out` {str(out_dir)!r}, the export's folder, is a file, not"
                                  " a folder. Choose another `out` folder.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise SettingError("out", f"`out` {str(out_dir)!r}, the export's folder, already exists"
                                  " and is not empty. Choose another `out` folder, or set"
                                  " `overwrite` to replace it.")
    model, spec = load_trial_model(run_dir, trial)
    source = run.trial_folder(run_dir, trial).weights

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    staged = ExportFolder(tmp)
    try:
        spec.save(staged.arch)
        shutil.copyfile(source, staged.weights)
        sha = _sha256(staged.weights)
        if sha != _sha256(source):
            raise ConfigError(f"weights file {str(source)!r} changed while it was copied."
                              " Export again once nothing writes to the trial folder.")
        # The copy must load exactly like the source did.
        build_with_weights(spec, load_weights(staged.weights), source="exported weights")
        if ArchSpec.load(staged.arch) != spec:
            raise RuntimeError(f"the exported {ARCH_FILE} does not round-trip to the ArchSpec")
        onnx_error = export_onnx(model, spec, staged.onnx)
        training = trial_training(run_dir, info, trial.user_attrs.get("budget"))
        preprocessing = training_preprocessing(training, spec)
        atomic_write_json(staged.config, hub_config(spec, preprocessing,
                                                    label_names=_label_names(training)))
        recipe = dict(training.to_dict(), dataset=_portable_dataset(training.dataset))
        atomic_write_text(staged.training, yaml.safe_dump(recipe, sort_keys=False))
        outputs.write_export_marker(tmp)
        atomic_write_text(staged.card, model_card(
            run_dir=run_dir, info=info, study_name=study.study_name, trial=trial, spec=spec,
            out_dir=out_dir, weights_sha256=sha, onnx_error=onnx_error, training=training,
            preprocessing=preprocessing))
        for name in EXPORT_FILES:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp / name, 0o644)  # an export is meant to be shared
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        _fsync_dir(out_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_pick(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, method: str = "knee",
                max_gflops: float | None = None, max_params: float | None = None,
                overwrite: bool = False, storage: str | None = None,
                ) -> tuple[Path, FrozenTrial, str]:
    """Pick a Pareto trial (`nas.pareto.pick`) and export it; returns (out_dir, trial, why)."""
    study = pareto.open_study(run_dir, storage=storage)
    trial, why = pareto.pick(pareto.pareto_trials(study), max_gflops=max_gflops,
                             max_params=max_params, method=method)
    path = export_trial(run_dir, trial.number, out_dir, overwrite=overwrite, storage=storage)
    return path, trial, why


__all__ = [
    "EXPORT_FILES",
    "build_with_weights",
    "check_exportable",
    "export_onnx",
    "export_pick",
    "export_trial",
    "find_trial",
    "hub_config",
    "load_trial_model",
    "load_weights",
    "model_card",
    "trial_spec",
    "trial_training",
    "training_preprocessing",
    "verify_onnx",
]
