"""Every value of a space is bounded and checked as it is read, before the loader builds, counts
or samples anything: an absurd value is one line naming the key, the value and the bound, at
once, instead of minutes of work and gigabytes of memory."""

from __future__ import annotations

import time

import pytest
import yaml

from launch import cli
from search_spaces.fields import MAX_CHOICES, MAXIMA
from search_spaces.search_defaults import MAX_INFEASIBLE
from search_spaces.space import SearchSpace
from spvit.errors import ConfigError
from tests.messages import assert_names_value_and_fix
from tests.tiny_space import tiny_space


def _with(path: tuple, value):
    data = tiny_space()
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return data


def _refused(data, *values) -> str:
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        SearchSpace.from_dict(data)
    assert time.perf_counter() - started < 2.0  # refused before any enumeration
    message = str(info.value)
    assert "\n" not in message
    assert_names_value_and_fix(message, *values)
    return message


@pytest.mark.parametrize("path, value, bound", [
    (("dimensions", "depth"), [1_000_000_000], MAXIMA["depth"]),
    (("dimensions", "depth"), [1, 1_000_000], MAXIMA["depth"]),
    (("dimensions", "embed_dim"), [16, 10**9], MAXIMA["embed_dim"]),
    (("dimensions", "heads"), [1, 1024], MAXIMA["heads"]),
    (("dimensions", "mlp_ratio"), [1.0, 1.0e+6], MAXIMA["mlp_ratio"]),
    (("arch", "img_size"), 10**7, MAXIMA["img_size"]),
    (("arch", "patch_size"), 10**6, MAXIMA["patch_size"]),
    (("arch", "in_chans"), 10**5, MAXIMA["in_chans"]),
    (("arch", "num_classes"), 10**9, MAXIMA["num_classes"]),
    (("arch", "pool_width_factor"), 1000, MAXIMA["pool_width_factor"]),
    (("dimensions", "pool"), {"schedules": [[], [1, 10**9]]}, MAXIMA["block_index"]),
    (("dimensions", "pool"), {"free": True, "max_pools": 10**9}, MAXIMA["max_pools"]),
    (("dimensions", "pool"), {"free": True, "from_block": 10**9}, MAXIMA["block_index"]),
])
def test_each_dimension_has_a_bound(path, value, bound):
    data = _with(path, value)
    if path[-1] in ("img_size", "patch_size", "in_chans", "num_classes", "pool_width_factor"):
        data["dimensions"].pop(path[-1], None)
    too_big = max(value) if isinstance(value, list) else 10**9 if isinstance(value, dict) \
        else value
    message = _refused(data, too_big, bound)
    assert "at most" in message


def test_a_pool_schedule_longer_than_the_deepest_space_is_refused():
    _refused(_with(("dimensions", "pool"), {"schedules": [[], list(range(10_000))]}),
             10000, MAXIMA["depth"])


def test_a_choice_list_may_not_be_endless():
    _refused(_with(("dimensions", "embed_dim"), list(range(16, 16 * (MAX_CHOICES + 2), 16))),
             MAX_CHOICES + 1, MAX_CHOICES)


def test_max_infeasible_is_bounded():
    _refused(_with(("search", "max_infeasible"), 10**9), 10**9, MAX_INFEASIBLE)


def test_the_bounds_themselves_load():
    data = _with(("dimensions", "depth"), [1, MAXIMA["depth"]])
    data["constraints"] = {}
    space = SearchSpace.from_dict(data)
    assert max(space.values_of("depth")) == MAXIMA["depth"]


def test_check_space_refuses_a_huge_depth_in_one_line(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(_with(("dimensions", "depth"), [1_000_000_000])))
    started = time.perf_counter()
    code = cli.main(["check-space", str(path)])
    assert time.perf_counter() - started < 10.0
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "dimensions.depth[0] must be at most 64" in err[0] and "1000000000" in err[0]
    assert f"{path}:" in err[0]  # the file and line of the bad key
