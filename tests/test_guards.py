"""The trainer's guard rails as pure functions (imgclf.train.guards): chance level, a stage
ending below the previous one, a diverged loss, and the Ctrl-C handler. The trainer's use
of them is covered end to end in test_transfer_guards.py and test_train.py."""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path

import pytest
import torch

from imgclf.train.guards import (
    CHANCE_MARGIN,
    STAGE_DROP_MIN,
    CtrlC,
    chance_warning,
    diverged_message,
    majority_rate,
    noise,
    stage_drop_warning,
)

# ------------------------------------------------------------------ chance level


def test_majority_rate_is_the_most_common_class_share():
    assert majority_rate(torch.tensor([0, 0, 1, 2])) == 0.5
    assert majority_rate(torch.tensor([2, 2, 2])) == 1.0
    assert math.isnan(majority_rate(None))  # no validation split
    assert math.isnan(majority_rate(torch.tensor([], dtype=torch.int64)))


def test_chance_warning_within_the_margin_of_the_majority_rate():
    majority = 0.5
    text = chance_warning(1, 4, majority + CHANCE_MARGIN, majority)
    assert text is not None and text.startswith("stage 2: epoch 4 val accuracy 0.5200")
    assert "always answering the most common class (0.5000, 2 points of margin)" in text
    assert "--set optimizer.lr=" in text and "imgclf data info" in text
    assert chance_warning(0, 1, 0.10, majority) is not None  # below chance warns too
    assert chance_warning(0, 1, majority + CHANCE_MARGIN + 0.001, majority) is None


def test_chance_warning_never_fires_without_numbers():
    assert chance_warning(0, 1, float("nan"), 0.5) is None  # no validation split
    assert chance_warning(0, 1, 0.3, float("nan")) is None


def test_chance_warning_once_per_stage():
    first = chance_warning(0, 1, 0.33, 0.34)
    assert first is not None
    assert chance_warning(0, 2, 0.33, 0.34, [first]) is None  # stage 1 said it already
    later = chance_warning(1, 3, 0.33, 0.34, [first])  # stage 2 has its own
    assert later is not None and later.startswith("stage 2: epoch 3")
    other = "stage 2: something else entirely"  # not a chance-level warning
    assert chance_warning(1, 3, 0.33, 0.34, [other]) is not None


# ------------------------------------------------------------------ stage drop


def test_noise_is_two_standard_errors_and_at_least_the_minimum():
    assert noise(0.8, 60) == pytest.approx(2 * math.sqrt(0.8 * 0.2 / 60))  # 10.3 points
    assert noise(0.8, 1_000_000) == STAGE_DROP_MIN  # a large split: the floor
    assert noise(1.0, 100) == STAGE_DROP_MIN  # no variance at 100%
    assert noise(0.8, 0) == STAGE_DROP_MIN  # no validation images


def test_stage_drop_within_the_noise_is_quiet():
    assert stage_drop_warning(1, 0.72, 0.80, 60) is None  # 8 points of a 10.3-point band
    assert stage_drop_warning(1, 0.85, 0.80, 60) is None  # better
    assert stage_drop_warning(1, 0.80, 0.80, 60) is None  # level
    assert stage_drop_warning(1, float("nan"), 0.80, 60) is None  # no validation split


def test_stage_drop_beyond_the_noise_warns_with_both_stages():
    text = stage_drop_warning(2, 0.65, 0.80, 60)
    assert text is not None
    assert text.startswith("stage 3 ended at val accuracy 0.6500, below stage 2's 0.8000")
    assert "batchnorm=frozen" in text and "best.pt" in text
    # On a large split the floor decides: just over STAGE_DROP_MIN warns, just under not.
    assert stage_drop_warning(1, 0.80 - STAGE_DROP_MIN - 1e-3, 0.80, 10**7) is not None
    assert stage_drop_warning(1, 0.80 - STAGE_DROP_MIN + 1e-3, 0.80, 10**7) is None


# ------------------------------------------------------------------ divergence


def test_diverged_message_names_the_step_and_the_checkpoint():
    last = Path("/runs/r/last.pt")
    text = diverged_message(float("nan"), 1, 3, 4, last)
    assert text == (
        "loss became nan at stage 2, epoch 3, step 5; lower the learning rate "
        "(last good checkpoint: /runs/r/last.pt)"
    )
    assert "loss became inf at" in diverged_message(float("inf"), 0, 1, 0, None)
    assert diverged_message(float("inf"), 0, 1, 0, None).endswith("(no checkpoint)")


def test_diverged_message_from_another_process():
    """A rank whose own loss is finite reports that another one's was not."""
    text = diverged_message(0.7, 0, 2, 9, None)
    assert text.startswith(
        "loss or weights became non-finite on another process at stage 1, epoch 2"
    )
    assert "step 10;" in text


# ------------------------------------------------------------------ Ctrl-C


@pytest.fixture
def default_sigint():
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's own handler here")


def test_first_ctrl_c_is_a_request_the_second_interrupts(default_sigint):
    with CtrlC() as ctrl_c:
        assert not ctrl_c.requested
        signal.raise_signal(signal.SIGINT)
        assert ctrl_c.requested  # no KeyboardInterrupt: the loop acts between steps
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_ctrl_c_installs_nothing_outside_the_main_thread(default_sigint):
    seen = []

    def enter():
        with CtrlC():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]


def test_ctrl_c_leaves_an_ignored_sigint_alone():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with CtrlC():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
