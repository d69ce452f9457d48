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
* `README.md`          a model card: metrics, cost, dataset, budget, architecture, how to load it
                       (spvit, timm, onnxruntime) and how to retrain it.

Everything is written into a hidden temporary folder next to `out_dir`, which is renamed to
`out_dir` only when complete, so a killed export never leaves half a folder. Trials that cannot
be exported (unknown number, failed, pruned, below the full budget, infeasible, missing or
corrupt weights) raise `ConfigError` with one line (the CLI exits 2). No Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from nas import outputs, pareto
from spvit.arch import ArchSpec
from spvit.errors import ConfigError
from spvit.io import atomic_write_text

ONNX_OPSET = 17
ONNX_INPUT = "image"
ONNX_OUTPUT = "logits"
ONNX_ATOL = 1e-4
WEIGHTS_FILE = "model.safetensors"
ARCH_FILE = "arch.yaml"
ONNX_FILE = "model.onnx"
CARD_FILE = "README.md"


# ---------------------------------------------------------------------------- checks
def find_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """The trial with this number, or a `ConfigError` naming the valid range."""
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ConfigError(f"a trial number is an integer >= 0, but got {number!r}."
                          " Pick one from `spvit-nas pareto RUN_DIR`.")
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.number == number:
            return t
    have = f"trials 0-{len(trials) - 1}" if trials else "no trials"
    raise ConfigError(f"trial {number} does not exist in study {study.study_name!r} ({have})."
                      " Pick one from `spvit-nas pareto RUN_DIR`.")


def check_exportable(trial: FrozenTrial) -> None:
    """Raise `ConfigError` unless `trial` finished its full training budget."""
    n = trial.number
    kind = pareto.trial_kind(trial)
    attrs = trial.user_attrs
    if kind == "full":
        return
    if kind == "infeasible":
        raise ConfigError(f"trial {n} was rejected by a constraint before training (infeasible),"
                          " so it has no weights. Export a trial from the Pareto set.")
    if kind == "failed":
        reason = " ".join(str(attrs.get("fail_reason") or "no reason recorded").split())
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise ConfigError(f"trial {n} failed ({reason}), so it has no trained weights."
                          " Export a trial from the Pareto set.")
    if kind == "pruned":
        raise ConfigError(f"trial {n} was pruned after {attrs.get('fidelity', '?')} of"
                          f" {attrs.get('budget', '?')} epochs; only full-budget trials are"
                          " exported. Export a trial from the Pareto set.")
    if kind == "partial":
        raise ConfigError(f"trial {n} completed only {attrs.get('fidelity', '?')} of"
                          f" {attrs.get('budget', '?')} epochs (fidelity != budget); only"
                          " full-budget trials are exported. Export a trial from the Pareto set.")
    raise ConfigError(f"trial {n} is still {trial.state.name} and has no final weights yet."
                      " Wait for it to finish or export another trial.")


def trial_spec(run_dir: str | os.PathLike, trial: FrozenTrial) -> ArchSpec:
    """The trial's ArchSpec (study `arch` attr; its arch.yaml must agree when both exist)."""
    folder = pareto.trial_dir(run_dir, trial)
    flat = trial.user_attrs.get("arch")
    spec = None
    if flat is not None:
        try:
            spec = ArchSpec.from_dict(flat)
        except ConfigError as e:
            raise ConfigError(f"trial {trial.number}: the study's `arch` attribute is not a valid"
                              f" architecture ({e}). The study is damaged; export another"
                              " trial.") from None
    file_spec = ArchSpec.load(folder / ARCH_FILE) if (folder / ARCH_FILE).is_file() else None
    if spec is None and file_spec is None:
        raise ConfigError(f"trial {trial.number} has neither an `arch` attribute in the study nor"
                          f" {folder / ARCH_FILE}. Its architecture is unknown; export another"
                          " trial.")
    if spec is not None and file_spec is not None and spec != file_spec:
        raise ConfigError(f"trial {trial.number}: {folder / ARCH_FILE} differs from the"
                          " architecture the study recorded. The trial folder does not belong"
                          " to this trial; check `trial_dir` or export another trial.")
    return spec if spec is not None else file_spec


def load_weights(path: str | os.PathLike) -> dict[str, Any]:
    """A safetensors state dict, or a one-line `ConfigError` if it is missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {str(path)!r} is missing (the trial never finished"
                          " writing its consolidated weights). Export another trial.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"weights file {str(path)!r} is corrupt or not safetensors ({first})."
                          " Export another trial or retrain this one.") from None


def build_with_weights(spec: ArchSpec, state: dict[str, Any], *, source: str = "weights"):
    """`spvit.create_model(spec)` in eval mode with `state` loaded strictly (checked finite)."""
    import torch

    import spvit

    model = spvit.create_model(spec)
    bad_dtype = sorted(k for k, v in state.items()
                       if v.is_floating_point() and v.dtype != torch.float32)
    if bad_dtype:
        raise ConfigError(f"{source}: tensors {bad_dtype[:3]} are not float32; the consolidated"
                          " weights must be fp32. Re-save them as fp32 or retrain.")
    not_finite = sorted(k for k, v in state.items()
                        if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if not_finite:
        raise ConfigError(f"{source}: tensors {not_finite[:3]} contain NaN or inf (the training"
                          " diverged). Export another trial.")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state))
                  if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        raise ConfigError(
            f"{source} do not match the architecture: missing {missing[:3]}, unexpected"
            f" {unexpected[:3]}, shape {mismatched[:2]}. The file belongs to another"
            " architecture; export another trial."
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_trial_model(run_dir: str | os.PathLike, trial: FrozenTrial):
    """(model in eval mode with the trial's trained weights, its ArchSpec)."""
    check_exportable(trial)
    spec = trial_spec(run_dir, trial)
    path = pareto.trial_dir(run_dir, trial) / WEIGHTS_FILE
    model = build_with_weights(spec, load_weights(path), source=f"weights file {str(path)!r}")
    return model, spec


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


def _training_block(run_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    from nas.report import _training_block as block

    return block(run_dir, info)


def _normalisation(dataset: str, in_chans: int) -> str:
    """How the search fed images to the model (the validation transform of `nas.data`)."""
    from search_spaces.training import parse_dataset

    try:
        kind, _ = parse_dataset(dataset)
    except ConfigError:
        return "normalised as in training (dataset unknown)."
    if kind == "digits":
        return ("8x8 digit scans upsampled bilinearly to the input size and normalised with the"
                " training split's pixel mean and standard deviation (`nas.data`).")
    from nas import data

    mean, std = {"cifar10": (data.CIFAR10_MEAN, data.CIFAR10_STD),
                 "cifar100": (data.CIFAR100_MEAN, data.CIFAR100_STD)}.get(
        kind, (data.IMAGENET_MEAN, data.IMAGENET_STD))
    if in_chans == 1:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return (f"pixels in [0, 1] normalised per channel with mean {tuple(mean)} and std"
            f" {tuple(std)} (`nas.data`, validation transform).")


def model_card(*, run_dir: Path, info: dict[str, Any], study_name: str, trial: FrozenTrial,
               spec: ArchSpec, out_dir: Path, weights_sha256: str, onnx_error: float) -> str:
    """The README.md of an export."""
    acc, gflops, params = trial.values
    attrs = trial.user_attrs
    metrics = pareto.read_metrics(pareto.trial_dir(run_dir, trial) / "metrics.jsonl")
    last = metrics[-1] if metrics else {}
    training = _training_block(run_dir, info)
    dataset = training.get("dataset", "unknown")
    folder = str(out_dir)

    def metric(name: str, fmt: str) -> str:
        v = last.get(name)
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    block_rows = []
    has_cls = spec.block_has_cls()
    for i, (b, side, width) in enumerate(zip(spec.blocks, spec.block_grids(),
                                             spec.block_widths(), strict=True)):
        prior = b.prior if isinstance(b.prior, str) else ", ".join(b.prior)
        block_rows.append(f"| {i} | {side}x{side}{' + CLS' if has_cls[i] else ''} | {width} |"
                          f" {b.heads} | {prior} | {'yes' if b.share else ''} |"
                          f" {'yes' if b.pool else ''} |")
    recipe = ", ".join(f"{k} {v}" for k, v in training.items()
                       if k in ("epochs", "batch_size", "lr", "min_lr", "warmup_epochs",
                                "weight_decay", "label_smoothing", "zero_stage", "bf16",
                                "workers_per_trial", "augment", "seed"))
    lines = [
        f"# SP-ViT trial {trial.number} of search `{study_name}`",
        "",
        "A vision transformer from the SP-ViT family (spatial-prior attention, token pooling,"
        " attention sharing, structured attention initialisation) found by a multi-objective"
        " search over accuracy, GFLOPs and parameters.",
        "",
        "## Metrics",
        "| metric | value |",
        "|---|---:|",
        f"| validation top-1 accuracy | {100 * acc:.2f}% |",
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
        f"- training budget: {attrs.get('budget')} epochs" + (f"; recipe: {recipe}" if recipe
                                                              else ""),
        f"- search run: `{run_dir}`, study `{study_name}`, trial {trial.number}"
        f" (folder `{attrs.get('trial_dir', '-')}`)",
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
        f"- `{ARCH_FILE}`: the architecture (`spvit.ArchSpec`).",
        f"- `{WEIGHTS_FILE}`: trained fp32 weights, sha256 `{weights_sha256}`.",
        f"- `{ONNX_FILE}`: ONNX opset {ONNX_OPSET}, input `{ONNX_INPUT}` float32"
        f" (batch, {spec.in_chans}, {spec.img_size}, {spec.img_size}), output `{ONNX_OUTPUT}`"
        f" (batch, {spec.num_classes}); batch axis dynamic; max |onnxruntime - torch| on random"
        f" inputs {onnx_error:.2g}.",
        "",
        f"Inputs: {_normalisation(dataset, spec.in_chans)}",
        "",
        "## Use",
        "With spvit:",
        "```python",
        "import spvit",
        "from safetensors.torch import load_file",
        "",
        f'model = spvit.create_model("{folder}/{ARCH_FILE}")',
        f'model.load_state_dict(load_file("{folder}/{WEIGHTS_FILE}"))',
        "model.eval()",
        "```",
        "With timm (spvit registers the `spvit` entry point):",
        "```python",
        "import timm",
        "import spvit  # noqa: F401  (registers the models)",
        "",
        f'model = timm.create_model("spvit", arch="{folder}/{ARCH_FILE}", pretrained=True,',
        f'                          pretrained_cfg_overlay=dict(file="{folder}/{WEIGHTS_FILE}"))',
        "```",
        "With onnxruntime:",
        "```python",
        "import onnxruntime as ort",
        "",
        f'session = ort.InferenceSession("{folder}/{ONNX_FILE}")',
        f'logits = session.run(["{ONNX_OUTPUT}"], {{"{ONNX_INPUT}": images}})[0]'
        "  # images: float32 numpy",
        "```",
        "",
        "## Retrain",
        "```",
        f"spvit-nas train --arch {folder}/{ARCH_FILE} --out RUN_DIR",
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
        raise ConfigError(f"export target {str(out_dir)!r} is a file, not a folder."
                          " Pass another --out.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"export folder {str(out_dir)!r} already exists and is not empty."
                          " Pass another --out or --overwrite to replace it.")
    model, spec = load_trial_model(run_dir, trial)
    source = pareto.trial_dir(run_dir, trial) / WEIGHTS_FILE

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        spec.save(tmp / ARCH_FILE)
        shutil.copyfile(source, tmp / WEIGHTS_FILE)
        sha = _sha256(tmp / WEIGHTS_FILE)
        if sha != _sha256(source):
            raise ConfigError(f"weights file {str(source)!r} changed while it was copied."
                              " Export again once nothing writes to the trial folder.")
        # The copy must load exactly like the source did.
        build_with_weights(spec, load_weights(tmp / WEIGHTS_FILE), source="exported weights")
        if ArchSpec.load(tmp / ARCH_FILE) != spec:
            raise RuntimeError("the exported arch.yaml does not round-trip to the ArchSpec")
        onnx_error = export_onnx(model, spec, tmp / ONNX_FILE)
        outputs.write_export_marker(tmp)
        atomic_write_text(tmp / CARD_FILE, model_card(
            run_dir=run_dir, info=info, study_name=study.study_name, trial=trial, spec=spec,
            out_dir=out_dir, weights_sha256=sha, onnx_error=onnx_error))
        for name in (ARCH_FILE, WEIGHTS_FILE, ONNX_FILE, CARD_FILE):
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
    "build_with_weights",
    "check_exportable",
    "export_onnx",
    "export_pick",
    "export_trial",
    "find_trial",
    "load_trial_model",
    "load_weights",
    "model_card",
    "trial_spec",
    "verify_onnx",
]
