"""Transactional client calls are bounded even when the client ignores its own timeout
(librdkafka#5456): the worker gives up on the call instead of stalling for minutes."""

from __future__ import annotations

import threading
import time

import pytest

from onceflow import _kafka
from onceflow._errors import StoreError


def test_a_call_that_never_returns_is_abandoned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_kafka, "TXN_TIMEOUT_S", 0.2)
    release = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="did not return within"):
        _kafka._bounded(lambda: release.wait(60), "send_offsets_to_transaction")
    release.set()
    assert time.monotonic() - t0 < 5


def test_a_call_returns_its_value_or_raises_its_error() -> None:
    assert _kafka._bounded(lambda: 42, "commit_transaction") == 42

    def fails() -> None:
        raise ValueError("from the client")

    with pytest.raises(ValueError, match="from the client"):
        _kafka._bounded(fails, "abort_transaction")
