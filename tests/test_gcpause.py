"""gc_paused: the collector is off inside, back on after the last pauser leaves, and left off
if someone else had turned it off."""

from __future__ import annotations

import gc
import threading

from xdpfw.gcpause import gc_paused


def test_nested_pauses_resume_only_at_the_outermost():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled(), "the inner pause must not resume the collector"
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off():
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_pauses_in_two_threads():
    inside, leave = threading.Event(), threading.Event()

    def other():
        with gc_paused():
            inside.set()
            leave.wait(5)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(5)
    with gc_paused():
        pass
    assert not gc.isenabled(), "the other thread still holds its pause"
    leave.set()
    t.join(5)
    assert gc.isenabled()


def test_an_exception_inside_resumes_the_collector():
    try:
        with gc_paused():
            raise ValueError("boom")
    except ValueError:
        pass
    assert gc.isenabled()


def test_a_pause_that_made_many_objects_ends_with_them_collected():
    """Otherwise the next small request pays for walking all of them."""
    from xdpfw import gcpause

    with gc_paused():
        kept = [[i] for i in range(2 * gcpause.SETTLE_FROM)]  # lists: tracked by the collector
        assert gc.get_count()[0] >= gcpause.SETTLE_FROM
    assert gc.get_count()[0] < 1000, "the objects made during the pause were not collected"
    assert len(kept) == 2 * gcpause.SETTLE_FROM and gc.is_tracked(kept[0])  # alive, only moved
