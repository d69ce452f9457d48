"""`spvit-nas search --strategy oneshot`: its flags are checked before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.search import SearchRequest, plan_search
from spvit.errors import ConfigError

SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "digits.yaml"


@pytest.mark.parametrize("change, message", [
    (dict(strategy="oneshot"), "needs a trained supernet: pass --supernet DIR"),
    (dict(retrain=3), "--retrain applies to --strategy oneshot only"),
    (dict(supernet=Path("sn")), "--supernet applies to --strategy oneshot only"),
    (dict(strategy="oneshot", supernet=Path("sn"), retrain=0), "retrain must be"),
    (dict(strategy="fast"), "--strategy must be full or oneshot"),
    (dict(finetune_steps=20), "--finetune-steps applies to --strategy oneshot only"),
    (dict(strategy="oneshot", supernet=Path("sn"), finetune_steps=-1),
     "--finetune-steps must be an integer >= 0, but got -1"),
    (dict(rescore=8), "--rescore applies to --strategy oneshot only"),
    (dict(strategy="oneshot", supernet=Path("sn"), rescore=8),
     "--rescore 8 re-scores .* but --finetune-steps is not set"),
    (dict(strategy="oneshot", supernet=Path("sn"), finetune_steps=20, retrain=6, rescore=4),
     r"--rescore must be an integer >= --retrain \(6\), but got 4"),
])
def test_oneshot_flags_are_checked_before_anything_is_written(tmp_path, change, message):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        plan_search(SearchRequest(out=out, space=SPACE, **change))
    assert not out.exists()


def test_a_missing_supernet_folder_is_refused_before_the_run_folder_exists(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        plan_search(SearchRequest(out=out, space=SPACE, strategy="oneshot",
                                  supernet=tmp_path / "absent"))
    assert str(tmp_path / "absent") in str(info.value)
    assert not out.exists()


def test_retrain_sets_the_trial_budget(tmp_path, monkeypatch):
    import nas.oneshot

    class Folder:
        def check_space(self, space):
            self.space = space

    monkeypatch.setattr(nas.oneshot, "open_supernet", lambda path, **kw: Folder())
    plan = plan_search(SearchRequest(out=tmp_path / "run", space=SPACE, strategy="oneshot",
                                     supernet=tmp_path / "sn", retrain=4))
    assert plan.info.trials == 4
