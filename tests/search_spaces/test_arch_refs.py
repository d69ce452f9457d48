"""The one `--arch` reading shared by `spvit-nas cost` and `spvit-nas train`."""

from __future__ import annotations

from pathlib import Path

import pytest

from search_spaces.arch_refs import reference_names, resolve_arch
from spvit.arch import ArchSpec
from spvit.errors import ConfigError
from spvit.factory import registered_arch

ROOT = Path(__file__).resolve().parents[2]


def test_a_path_a_reference_and_a_registered_name_resolve():
    path = ROOT / "search_spaces" / "archs" / "deit_tiny.yaml"
    assert resolve_arch(str(path)) == ArchSpec.load(path)
    assert resolve_arch("deit_tiny") == ArchSpec.load(path)
    assert "deit_tiny" in reference_names()
    assert resolve_arch("spvit_test") == registered_arch("spvit_test")


def test_unknown_names_and_space_files_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="neither a file nor a reference.*mean 'deit_tiny'"):
        resolve_arch("deit_tiniest")
    with pytest.raises(ConfigError, match="is a search-space file, not an architecture"):
        resolve_arch(str(ROOT / "search_spaces" / "digits.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_arch("no/such/arch.yaml")
