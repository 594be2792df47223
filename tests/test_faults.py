"""Fault injection itself: crash and pause specs, a child that pauses at a protocol step
and resumes, and an in-process zombie that resumes after its successor took over."""

from __future__ import annotations

from pathlib import Path

import pytest

from onceflow import ConfigError, FencedError
from onceflow._crash import CrashInjector, SimulatedCrash
from onceflow._supervisor import Child, wait_until
from onceflow.testing import Event, diff, reference, send, snapshot

from . import pipelines
from .helpers import ROOT, zombie_beside


def events(n: int) -> list[Event]:
    return [Event("amounts", {"n": i % 7}, key=f"k{i % 5}", id=f"e{i}") for i in range(n)]


@pytest.mark.parametrize("spec", ["nowhere", "in_transaction:x", "in_transaction@soon"])
def test_a_malformed_pause_spec_is_refused(spec: str) -> None:
    with pytest.raises(ConfigError):
        CrashInjector(None, pause=spec)


def test_the_injector_pauses_at_the_nth_time_then_crashes_where_armed() -> None:
    seen: list[str] = []
    inj = CrashInjector("after_commit:2", "raise", pause="before_commit:2", on_pause=seen.append)
    inj("before_commit")
    assert seen == []
    inj("before_commit")
    inj("before_commit")
    assert seen == ["before_commit"]  # once, the 2nd time
    inj("after_commit")
    with pytest.raises(SimulatedCrash):
        inj("after_commit")


def test_a_child_paused_at_a_step_stops_there_and_goes_on_when_resumed(tmp_path: Path) -> None:
    store = str(tmp_path / "paused.db")
    evs = events(60)
    send(store, evs)
    child = Child(
        "tests.pipelines:running_sum_app",
        store=store,
        until_idle=True,
        pause_at="before_commit:2",
        cwd=str(ROOT),
    )
    try:
        assert wait_until(child.stopped, 60), child.stderr()
        child.resume()
        assert child.wait(60) == 0, child.stderr()
    finally:
        child.kill()
    expected = reference(pipelines.running_sum(), evs, store=tmp_path / "reference.db")
    assert diff(snapshot(pipelines.running_sum(), store), expected) == []


def test_an_app_paused_before_its_commit_is_fenced_when_it_resumes(tmp_path: Path) -> None:
    """A zombie: paused with an epoch in memory while a successor takes over and
    processes everything; resumed, it must not commit anything."""
    store = str(tmp_path / "zombie.db")
    evs = events(40)
    send(store, evs)
    zombie = pipelines.running_sum()
    zombie.store = store

    def successor() -> None:
        app = pipelines.running_sum()
        app.store = store
        app.run(until_idle=True)

    assert isinstance(zombie_beside(zombie, "before_commit", successor), FencedError)
    expected = reference(pipelines.running_sum(), evs, store=tmp_path / "reference.db")
    assert diff(snapshot(pipelines.running_sum(), store), expected) == []
