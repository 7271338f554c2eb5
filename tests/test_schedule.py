"""ω(step) at the boundaries of the KD phase, for every transition."""

import math

import pytest

from salt_megatron import SaltSchedule


def test_step_transition_boundaries():
    s = SaltSchedule(kd_weight=0.5, kd_steps=10, transition="step")
    assert [s.weight(i) for i in (0, 9, 10, 11, 1000)] == [0.5, 0.5, 0.0, 0.0, 0.0]
    assert s.teacher_needed(9) and not s.teacher_needed(10)
    assert s.last_teacher_step() == 9


def test_linear_decay_over_whole_phase():
    s = SaltSchedule(kd_weight=0.8, kd_steps=4, transition="linear")
    assert [s.weight(i) for i in range(6)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0, 0.0])
    assert s.teacher_needed(3) and not s.teacher_needed(4)


def test_linear_decay_window_holds_then_ramps():
    s = SaltSchedule(kd_weight=1.0, kd_steps=10, transition="linear", decay_steps=2)
    assert [s.weight(i) for i in (0, 7, 8, 9, 10)] == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.0])


def test_cosine_decay():
    s = SaltSchedule(kd_weight=1.0, kd_steps=4, transition="cosine")
    expected = [0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)] + [0.0]
    assert [s.weight(i) for i in range(5)] == pytest.approx(expected)
    assert all(s.weight(i) > 0 for i in range(4))


def test_rkd_is_kd_for_every_step():
    s = SaltSchedule(kd_weight=0.5, kd_steps=100)
    assert all(s.teacher_needed(i) for i in range(100)) and not s.teacher_needed(100)


@pytest.mark.parametrize("sched", [SaltSchedule(kd_weight=0.0, kd_steps=10), SaltSchedule(kd_weight=0.5, kd_steps=0)])
def test_no_kd_never_needs_the_teacher(sched):
    assert not any(sched.teacher_needed(i) for i in range(20))
    assert sched.last_teacher_step() is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kd_weight=1.5, kd_steps=3), "kd_weight"),
        (dict(kd_weight=-0.1, kd_steps=3), "kd_weight"),
        (dict(kd_weight=0.5, kd_steps=-1), "kd_steps"),
        (dict(kd_weight=0.5, kd_steps=3, transition="exp"), "transition"),
        (dict(kd_weight=0.5, kd_steps=3, transition="linear", decay_steps=4), "decay_steps"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SaltSchedule(**kwargs)


def test_negative_step_is_refused():
    with pytest.raises(ValueError, match="step"):
        SaltSchedule(kd_weight=0.5, kd_steps=3).weight(-1)


def test_state_dict_round_trip():
    s = SaltSchedule(kd_weight=0.3, kd_steps=7, transition="cosine", decay_steps=3)
    assert SaltSchedule.from_state_dict(s.state_dict()) == s
