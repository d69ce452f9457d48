"""search_spaces.fields: the one "integer >= N" rule and the messages its callers give."""

from __future__ import annotations

import pytest

from nas.oneshot import check_finetune_steps, rescore_count, select_for_retrain
from nas.samplers import make_sampler
from nas.storage import RetryStaleTrial
from search_spaces.fields import is_whole, whole_number
from search_spaces.training import TrainingConfig
from spvit.errors import ConfigError
from tests.messages import assert_names_value_and_fix


@pytest.mark.parametrize("value, minimum, expected", [
    (0, 0, True), (5, 1, True), (-3, None, True), (2**70, 1, True),
    (0, 1, False), (-1, 0, False), (True, 0, False), (False, None, False), (1.0, 1, False),
    ("3", 1, False), (None, 0, False),
])
def test_is_whole_is_an_int_that_is_not_a_bool(value, minimum, expected):
    assert is_whole(value, minimum) is expected


def test_whole_number_states_the_rule_the_value_and_the_fix():
    assert whole_number("--retrain", 6, 1, "Use e.g. 6.") == 6
    with pytest.raises(ConfigError) as e:
        whole_number("--retrain", 0, 1, "Use e.g. 6.")
    assert str(e.value) == "--retrain must be an integer >= 1, but got 0. Use e.g. 6."
    with pytest.raises(ConfigError) as e:
        whole_number("max_retry", True, 0, "Use e.g. max_retry=2.", rule="an integer >= 0 or None")
    assert str(e.value) == "max_retry must be an integer >= 0 or None, but got True. Use e.g." \
                           " max_retry=2."
    assert_names_value_and_fix(str(e.value), "max_retry", True)


@pytest.mark.parametrize("call, message", [
    (lambda: select_for_retrain([], 2.0), "`trials` must be an integer >= 1, but got 2.0."
                                          " Use e.g. 6."),
    (lambda: rescore_count(6, 5),
     "`oneshot.rescore` must be an integer >= `trials` (6), but got 5."),
    (lambda: check_finetune_steps(-1),
     "`oneshot.finetune_steps` must be an integer >= 0, but got -1."),
    (lambda: make_sampler("random", seed=True), "seed must be an integer >= 0, but got True."),
    (lambda: RetryStaleTrial(-1), "max_retry must be an integer >= 0 or None, but got -1."),
    (lambda: TrainingConfig(epochs=0), "training.epochs must be an integer >= 1, but got 0."
                                       " Set it to a whole number >= 1."),
    (lambda: TrainingConfig(train_subset=5), "training.train_subset must be an integer >= 10 or"
                                             " null, but got 5."),
])
def test_callers_keep_their_messages(call, message):
    with pytest.raises(ConfigError) as e:
        call()
    assert str(e.value).startswith(message)
    assert_names_value_and_fix(str(e.value))
