"""Export of a searched architecture (nas.export): round trips through spvit, timm and
onnxruntime, atomicity, and clean refusals. Uses the run folder of tests/nas/test_pareto.py."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from safetensors.torch import load_file

import spvit
from nas import export, outputs, pareto
from nas.layout import ExportFolder
from spvit.arch import ArchSpec
from spvit.errors import ConfigError
from tests.messages import assert_names_value_and_fix
from tests.nas.test_pareto import ARCHS, make_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("export"), weights=True)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    # trial 1: mixed priors, a pool, avg head; trial 3: conv stem, CLS joining late, a pool
    # carrying the CLS token, a shared block, sincos positions, conv positional layer
    root = tmp_path_factory.mktemp("out")
    return {n: export.export_trial(run_dir, n, root / f"trial{n}") for n in (1, 3)}


def _reference_model(run_dir, n):
    """The trial's model built independently: its ArchSpec + its consolidated weights."""
    model = spvit.create_model(ARCHS[n])
    model.load_state_dict(load_file(str(run_dir / f"trials/{n:04d}/model.safetensors")))
    return model.eval()


def _images(batch, spec, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size, generator=gen)


@pytest.mark.parametrize("n", [1, 3])
def test_folder_contents_and_arch_round_trip(exported, run_dir, n):
    out = exported[n]
    # exactly the layout's files, the ones the output guard recognises as an export
    assert {p.name for p in out.iterdir()} == ExportFolder.ALL_FILES
    assert sorted(export.EXPORT_FILES) == [
        "README.md", "arch.yaml", "config.json", "model.onnx", "model.safetensors",
        "training.yaml"]
    assert outputs.kind_of(out) == "export"
    spec = ArchSpec.load(out / "arch.yaml")
    assert spec == ARCHS[n]
    trial = pareto.open_study(run_dir).trials[n]
    assert spec.to_flat() == trial.user_attrs["arch"]
    src = run_dir / f"trials/{n:04d}/model.safetensors"
    assert (out / "model.safetensors").read_bytes() == src.read_bytes()
    state = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left


@pytest.mark.parametrize("n", [1, 3])
def test_spvit_and_timm_load_the_export(exported, run_dir, n):
    out = exported[n]
    ref = _reference_model(run_dir, n)
    x = _images(3, ARCHS[n], seed=n)
    with torch.no_grad():
        expected = ref(x)
        model = spvit.create_model(str(out / "arch.yaml"))
        model.load_state_dict(load_file(str(out / "model.safetensors")))
        assert torch.equal(model.eval()(x), expected)
        via_timm = timm.create_model("spvit", arch=str(out / "arch.yaml"), pretrained=True,
                                     pretrained_cfg_overlay=dict(
                                         file=str(out / "model.safetensors")))
        assert torch.equal(via_timm.eval()(x), expected)
    # a fresh model differs, so the equality above is the weights' doing
    assert not torch.allclose(spvit.create_model(ARCHS[n], seed=0).eval()(x), expected)


@pytest.mark.parametrize("n", [1, 3])
def test_onnx_matches_torch_at_two_batch_sizes(exported, run_dir, n):
    out = exported[n]
    proto = onnx.load(str(out / "model.onnx"))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch axis
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ref = _reference_model(run_dir, n)
    for batch in (1, 5):
        x = _images(batch, ARCHS[n], seed=10 + batch)
        with torch.no_grad():
            expected = ref(x).numpy()
        got = session.run(["logits"], {"image": x.numpy()})[0]
        assert got.shape == (batch, ARCHS[n].num_classes)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_model_card(exported, run_dir):
    card = (exported[1] / "README.md").read_text(encoding="utf-8")
    for needle in ("90.00%", "| parameters | 9,000 |", "0.03 |", "`digits`", "2 / 2",
                   "spvit-nas train --arch arch.yaml --training training.yaml --out retrain",
                   'timm.create_model("local-dir:trial1", pretrained=True)',
                   'spvit.create_model("trial1/arch.yaml")',
                   "onnxruntime", "| 2 | 2x2 | 32 | 4 | axial |  | yes |", "mimetic"):
        assert needle in card, needle
    assert "test top-1 accuracy" not in card  # the trial recorded no test accuracy
    card3 = (exported[3] / "README.md").read_text(encoding="utf-8")
    assert "| 3 | 2x2 + CLS | 32 | 2 | none | yes |  |" in card3  # the shared block


@pytest.mark.parametrize("number, needle", [
    (99, "trial 99 does not exist in study 'demo' (trials 0-8)"),
    (-1, "integer >= 0"),
    (6, "trial 6 failed (CUDA out of memory)"),
    (5, "trial 5 was pruned after 1 of 2 epochs"),
    (4, "trial 4 completed only 1 of 2 epochs"),
    (7, "rejected by a constraint"),
])
def test_unexportable_trials_are_refused(run_dir, tmp_path, number, needle):
    with pytest.raises(ConfigError) as e:
        export.export_trial(run_dir, number, tmp_path / "out")
    assert needle in str(e.value)
    assert_names_value_and_fix(str(e.value))
    assert not (tmp_path / "out").exists()


def _copy_run(run_dir, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


@pytest.mark.parametrize("damage, needle", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "is corrupt"),
    (lambda p: p.write_bytes(b"\x00garbage" * 64), "is corrupt"),
    (lambda p: p.unlink(), "is missing"),
    (lambda p: shutil.copyfile(p.parent.parent / "0008/model.safetensors", p),
     "do not match the architecture"),
])
def test_bad_weight_files_are_refused(run_dir, tmp_path, damage, needle):
    run = _copy_run(run_dir, tmp_path)
    damage(run / "trials/0001/model.safetensors")
    with pytest.raises(ConfigError) as e:
        export.export_trial(run, 1, tmp_path / "out")
    assert needle in str(e.value)
    assert_names_value_and_fix(str(e.value))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_nan_weights_and_mismatched_arch_yaml_are_refused(run_dir, tmp_path):
    from safetensors.torch import save_file

    run = _copy_run(run_dir, tmp_path)
    path = run / "trials/0001/model.safetensors"
    state = load_file(str(path))
    next(iter(state.values()))[...] = float("nan")
    save_file(state, str(path))
    with pytest.raises(ConfigError, match="NaN or inf"):
        export.export_trial(run, 1, tmp_path / "out")
    ARCHS[0].save(run / "trials/0002/arch.yaml")
    with pytest.raises(ConfigError, match="differs from the architecture the study recorded"):
        export.export_trial(run, 2, tmp_path / "out")


def test_failed_export_leaves_no_folder(run_dir, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("killed while exporting ONNX")

    monkeypatch.setattr(export, "export_onnx", crash)
    with pytest.raises(RuntimeError, match="killed"):
        export.export_trial(run_dir, 0, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_of_a_killed_export_is_cleaned_and_overwrite(run_dir, tmp_path):
    # a temp folder whose process is gone (pid 2**22 + 1 is above the default pid_max)
    stale = tmp_path / f".out.tmp-{2**22 + 1}-deadbeef"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    out = export.export_trial(run_dir, 8, tmp_path / "out")
    assert not stale.exists() and (out / "model.onnx").stat().st_size > 1000
    with pytest.raises(ConfigError, match="already exists"):
        export.export_trial(run_dir, 0, out)
    export.export_trial(run_dir, 0, out, overwrite=True)
    assert ArchSpec.load(out / "arch.yaml") == ARCHS[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert oct(os.stat(out / "model.onnx").st_mode & 0o777) == "0o644"


def test_export_pick_uses_the_budgets(run_dir, tmp_path):
    path, trial, why = export.export_pick(run_dir, tmp_path / "pick", method="best",
                                          max_gflops=0.025)
    assert trial.number == 2 and "highest accuracy" in why
    assert ArchSpec.load(path / "arch.yaml") == ARCHS[2]
    with pytest.raises(ConfigError, match="no Pareto trial fits"):
        export.export_pick(run_dir, tmp_path / "none", max_params=10)


# ---------------------------------------------------------------------------- Hub layout
@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    """Trial 8 made a digits model (1 channel, 10 classes) with a recorded test accuracy."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from tests.nas.test_pareto import make_study

    root = tmp_path_factory.mktemp("hub")
    digits = ARCHS[8].replace(in_chans=1, num_classes=10, img_size=24, patch_size=4)
    run = make_run(root, weights=True, archs={**ARCHS, 8: digits})
    trials = pareto.open_study(run).get_trials()
    trials[8].set_user_attr("test_acc", 0.5875)
    (run / "study.journal").unlink()
    make_study(JournalStorage(JournalFileBackend(str(run / "study.journal"))), trials)
    return run, export.export_trial(run, 8, root / "exports" / "digits-8"), digits


def test_timm_local_dir_rebuilds_weights_and_preprocessing(digits_export):
    from PIL import Image

    from nas import data
    from search_spaces.training import TrainingConfig

    run, out, spec = digits_export
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert isinstance(model, spvit.SPViT) and model.spec == spec
    ref = spvit.create_model(spec)
    ref.load_state_dict(load_file(str(run / "trials/0008/model.safetensors")))
    x = _images(4, spec, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.eval()(x), rtol=0, atol=1e-5)

    # timm's preprocessing is the training's: same statistics, same pixels.
    cfg = timm.data.resolve_data_config(model=model)
    train = data.build_datasets(TrainingConfig(dataset="digits"), spec)
    assert tuple(cfg["input_size"]) == (1, 24, 24) and cfg["interpolation"] == "bilinear"
    assert tuple(cfg["mean"]) == pytest.approx(train.mean, abs=1e-7)
    assert tuple(cfg["std"]) == pytest.approx(train.std, abs=1e-7)
    assert cfg["mean"][0] == pytest.approx(0.3054, abs=0.01)  # grey digits, not ImageNet's RGB
    transform = timm.data.create_transform(**cfg)
    _, _, val_x, _, _, _ = data.load_digits_split()
    for i in (0, 7):
        raw = Image.fromarray(val_x[i, 0].numpy(), mode="F")  # the 8x8 scan in [0, 1]
        expected, _ = train.val[i]
        torch.testing.assert_close(transform(raw), expected, rtol=0, atol=1e-5)


def test_hub_config_and_card_front_matter(digits_export):
    import json

    import yaml

    run, out, spec = digits_export
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["architecture"] == "spvit" and config["num_classes"] == 10
    assert config["num_features"] == spec.num_features and config["global_pool"] == "avg"
    assert ArchSpec.from_dict(config["model_args"]["arch"]) == spec
    assert config["label_names"] == [str(i) for i in range(10)]
    assert config["pretrained_cfg"]["input_size"] == [1, 24, 24]

    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "timm" and "timm" in meta["tags"]
    assert meta["datasets"] == ["digits"]
    results = {r["dataset"]["split"]: r["metrics"][0]["value"]
               for r in meta["model-index"][0]["results"]}
    assert results == {"validation": 60.0, "test": 58.75}
    assert "| test top-1 accuracy | 58.75% |" in card
    recipe = yaml.safe_load((out / "training.yaml").read_text(encoding="utf-8"))
    assert recipe["epochs"] == 2 and recipe["dataset"] == "digits" and recipe["lr"] == 0.002


def test_nothing_exported_holds_an_absolute_path(digits_export, exported):
    run, out, _ = digits_export
    for folder, roots in ((out, (run, out)), (exported[1], (exported[1],))):
        for path in folder.iterdir():
            data = path.read_bytes()
            for root in (*roots, "/tmp", os.path.expanduser("~"), os.getcwd()):
                assert str(root).encode() not in data, (path.name, str(root))


def test_folder_dataset_path_is_reduced_to_its_name():
    assert export._portable_dataset("folder:/data/sets/flowers") == "folder:flowers"
    assert export._portable_dataset("digits") == "digits"
