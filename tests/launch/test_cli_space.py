"""`spvit-nas cost` and `spvit-nas check-space`, run in-process through `launch.cli.main`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cli import main

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "search_spaces" / "digits.yaml"
DEIT_TINY = ROOT / "search_spaces" / "archs" / "deit_tiny.yaml"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------- cost
def test_cost_prints_params_and_gflops(capsys):
    rc, out, err = run(capsys, "cost", "--arch", DEIT_TINY)
    assert rc == 0 and err == ""
    assert "params: 5,717,416" in out
    assert "gflops: 1.2537" in out


def test_cost_json_is_one_object(capsys):
    rc, out, _ = run(capsys, "cost", "--arch", DEIT_TINY, "--json")
    assert rc == 0 and out.count("\n") == 1
    data = json.loads(out)
    assert data["params"] == 5_717_416 and isinstance(data["params"], int)
    assert isinstance(data["gflops"], float) and abs(data["gflops"] - 1.2537) < 1e-4
    assert data["macs"] == sum(p["macs"] for p in data["parts"].values())


def test_cost_at_another_image_size_and_by_reference_name(capsys):
    rc, out, _ = run(capsys, "cost", "--arch", "deit_small", "--img-size", "384", "--json")
    assert rc == 0
    data = json.loads(out)
    # timm's deit_small_patch16_384: 22.2 M parameters, 15.5 GMACs
    assert abs(data["params"] / 1e6 - 22.2) < 0.05 and abs(data["gflops"] - 15.5) < 0.05


def test_cost_of_a_flat_arch_file(capsys, tmp_path):
    path = tmp_path / "arch.yaml"
    path.write_text("depth: 2\nheads_0: 2\nheads_1: 2\nprior_0: mlp\nshare_1: true\n"
                    "img_size: 32\npatch_size: 4\nembed_dim: 16\nhead: avg\nnum_classes: 10\n")
    rc, out, _ = run(capsys, "cost", "--arch", path, "--json")
    assert rc == 0 and json.loads(out)["params"] > 0


# ---------------------------------------------------------------------------- check-space
def test_check_space_summarises_the_space(capsys):
    rc, out, err = run(capsys, "check-space", DIGITS, "--samples", "50")
    assert rc == 0 and err == ""
    assert "valid" in out and "size: 11,704,176 architectures" in out
    for name in ("depth", "embed_dim", "heads_{i}", "prior_{i}", "pool_{i}", "share_{i}"):
        assert name in out
    assert "gflops  min" in out and "feasible under constraints" in out


def test_check_space_json(capsys):
    rc, out, _ = run(capsys, "check-space", DIGITS, "--samples", "40", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["size"] == 11_704_176 and data["samples"] == 40
    assert 0 < data["gflops"]["min"] <= data["gflops"]["median"] <= data["gflops"]["max"]
    assert {d["name"] for d in data["dimensions"]} >= {"depth", "heads_{i}"}


# ---------------------------------------------------------------------------- bad input
def _digits_with(tmp_path: Path, old: str, new: str) -> Path:
    text = DIGITS.read_text()
    assert old in text
    path = tmp_path / "space.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


BAD_SPACES = {
    "malformed": ("  depth: [2, 3, 4]", "  depth: [2, 3, 4", r"not valid YAML at line \d+, column"),
    "unknown key": ("  embed_dim:", "  embed_dims:", "Did you mean 'embed_dim'"),
    "wrong type": ("  depth: [2, 3, 4]", "  depth: [2, three, 4]", "must be an integer"),
    "empty choices": ("  heads: [1, 2, 4]", "  heads: []", "empty choice list"),
    "impossible constraint": ("  max_gflops: 0.012", "  max_gflops: -1",
                              "max_gflops must be > 0"),
    "unsatisfiable": ("  max_params: 200000", "  max_params: 1000",
                      "met the constraints in 200 tries"),
    "bad training": ("  batch_size: 64", "  batch_size: 0",
                     "training.batch_size must be an integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_bad_space_files_exit_2_with_one_line(capsys, tmp_path, case):
    import re

    old, new, needle = BAD_SPACES[case]
    path = _digits_with(tmp_path, old, new)
    rc, out, err = run(capsys, "check-space", path, "--samples", "5")
    assert rc == 2 and out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("spvit-nas check-space: error: ") and "Traceback" not in err
    assert re.search(needle, err), err
    assert str(path) in err  # names the file


def test_unknown_key_error_names_the_line(capsys, tmp_path):
    path = _digits_with(tmp_path, "  embed_dim:", "  embed_dims:")
    line = next(i for i, s in enumerate(path.read_text().splitlines(), 1) if "embed_dims" in s)
    rc, _, err = run(capsys, "check-space", path)
    assert rc == 2 and f"space.yaml:{line}: unknown key 'embed_dims' in `dimensions:`" in err


@pytest.mark.parametrize("argv, needle", [
    (["check-space", "no/such/space.yaml"], "does not exist"),
    (["cost", "--arch", "no/such/arch.yaml"], "does not exist"),
    (["cost", "--arch", "deit_tiniest"], "neither a file nor a reference"),
    (["cost", "--arch", str(DIGITS)], "is a search-space file, not an architecture"),
    (["cost", "--arch", str(DEIT_TINY), "--img-size", "100"], "not divisible by patch_size"),
    (["check-space", str(DIGITS), "--samples", "0"], "--samples must be >= 1"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, needle):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == "" and err.count("\n") == 1 and needle in err, err
