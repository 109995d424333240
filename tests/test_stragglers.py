"""The straggler monitor's rule and settings (``recovery/stragglers.py``); a straggler run end to end is in
``test_chaos.py``."""

from __future__ import annotations

import pytest

from regrow.launch import cli
from regrow.recovery.stragglers import StragglerConfig, find_stragglers


def test_a_rank_busier_than_the_others_median_by_the_margin_is_named() -> None:
    assert find_stragglers([1.0, 1.1, 0.9, 2.0], margin=0.5) == [(3, 1.0)]
    assert find_stragglers([1.0, 1.1, 0.9, 1.4], margin=0.5) == []  # within the margin
    assert find_stragglers([1.0, 3.0], margin=0.5) == [(1, 1.0)]  # two ranks: the other one is the median
    assert find_stragglers([5.0], margin=0.5) == []  # one rank has no peers to be slower than
    # Two stragglers of four: each is compared with the median of the other three, which holds the other straggler.
    assert find_stragglers([1.0, 1.0, 4.0, 4.0], margin=0.5) == [(2, 1.0), (3, 1.0)]


@pytest.mark.parametrize("settings, problem", [
    (dict(window=0), "StragglerConfig.window=0 must be a whole number of steps >= 1"),
    (dict(window=True), "StragglerConfig.window=True must be a whole number"),
    (dict(margin=0), "StragglerConfig.margin=0 must be a finite number > 0"),
    (dict(margin=float("nan")), "StragglerConfig.margin=nan must be a finite number > 0"),
])
def test_settings_errors_name_the_field(settings: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(")):
        StragglerConfig(**settings)


@pytest.mark.timeout(60)
def test_the_command_line_names_the_flag(capsys) -> None:
    code = cli.main(["train", "--nproc", "2", "--preset", "tiny", "--steps", "4", "--global-batch", "4",
                     "--micro-batch", "2", "--straggler-window", "-1", "--straggler-margin", "inf"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "--straggler-window=-1 must be a whole number of steps >= 1" in err
    assert "(--straggler-window 0 turns detection off)" in err
