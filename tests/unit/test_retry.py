"""Retries of object-store requests (``shardstore/storage/retry.py``): what is retried, how often, how long."""

from __future__ import annotations

import time

import pytest

from shardstore.errors import StorageUnavailableError
from shardstore.storage.retry import RetryPolicy, retrying


class _Calls:
    """A request that fails ``failures`` times (after ``seconds`` each), then answers."""

    def __init__(self, error: Exception, failures: int = 1 << 30, seconds: float = 0.0) -> None:
        self.error, self.failures, self.seconds, self.count = error, failures, seconds, 0

    def __call__(self) -> str:
        self.count += 1
        time.sleep(self.seconds)
        if self.count <= self.failures:
            raise self.error
        return "answer"


def test_transient_errors_are_tried_again_until_the_request_answers():
    call = _Calls(ConnectionResetError("reset"), failures=3)
    assert retrying("reading x", call, RetryPolicy(attempts=6, base_s=0.001, cap_s=0.001)) == "answer"
    assert call.count == 4


def test_errors_no_retry_can_change_are_raised_at_once():
    call = _Calls(FileNotFoundError("gone"))
    with pytest.raises(FileNotFoundError):
        retrying("reading x", call, RetryPolicy(attempts=6, base_s=0.001, cap_s=0.001))
    assert call.count == 1


def test_tries_stop_at_the_bound_and_the_error_says_how_many():
    call = _Calls(ConnectionRefusedError("refused"))
    with pytest.raises(StorageUnavailableError, match=r"reading x failed with transient errors \(4 tries in 0 s; last: ConnectionRefusedError"):
        retrying("reading x", call, RetryPolicy(attempts=4, base_s=0.001, cap_s=0.001))
    assert call.count == 4


def test_no_try_starts_after_the_deadline_where_the_client_itself_retries_long():
    """A client that takes long to give up (gcsfs: ~35 s on a refused connection) is not tried again
    for the whole bound of tries: the deadline stops it."""
    call = _Calls(ConnectionRefusedError("refused"), seconds=0.2)
    with pytest.raises(StorageUnavailableError, match=r"\(2 tries in 0 s"):
        retrying("listing gs://b/x", call, RetryPolicy(attempts=10, base_s=0.0, cap_s=0.0, deadline_s=0.3))
    assert call.count == 2
