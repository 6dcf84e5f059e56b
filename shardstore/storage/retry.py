"""Retries of object-store requests: transient errors (5xx, throttling, connection resets, timeouts) are
tried again with exponential backoff and full jitter, a bounded number of times and for a bounded time;
then ``StorageUnavailableError``. Anything else (a missing object, a failed condition, bad credentials) is
raised at once: retrying cannot change its answer.

The client libraries retry too (botocore, gcsfs, azure-core), each in its own way and not for every
error (a connection reset mid-body reaches us from aiohttp as is); this layer makes the bound and the
final error the same on every backend. Where the client's own retries are long (gcsfs waits ~35 s
before giving up on a refused connection), six of ours on top kept a save on an unreachable endpoint
for 207 s; no try starts after ``deadline_s``, so that costs about two of the client's. Classification walks the exception chain, since fsspec backends
wrap the client's error (s3fs raises ``OSError`` from botocore's ``ClientError``).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from shardstore.errors import StorageUnavailableError

__all__ = ["RetryPolicy", "retrying", "is_transient"]

T = TypeVar("T")

_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Client exceptions for a connection that broke or timed out (aiohttp, botocore, azure-core, urllib3).
_TRANSIENT_NAMES = frozenset({
    "ClientConnectionError", "ClientOSError", "ServerDisconnectedError", "ClientPayloadError",
    "ServerTimeoutError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
    "ConnectTimeoutError", "ResponseStreamingError", "ServiceRequestError", "ServiceResponseError",
    "IncompleteReadError", "ProtocolError", "ChunkedEncodingError",
})


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all, none started ``deadline_s`` or more after the first; before try ``i``
    (from 1) a pause drawn uniformly from ``[0, min(cap_s, base_s * 2**(i-1))]`` (full jitter: racing
    ranks do not retry in lockstep)."""

    attempts: int = 6
    base_s: float = 0.2
    cap_s: float = 5.0
    deadline_s: float = 30.0

    def pause(self, retry: int) -> float:
        return random.uniform(0.0, min(self.cap_s, self.base_s * 2**retry))


DEFAULT = RetryPolicy()


def _status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries, under the names the client libraries use."""
    for attr in ("status_code", "status", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, is worth another try."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError)):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in _TRANSIENT_NAMES:
            return True
        if _status(exc) in _TRANSIENT_STATUS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retrying(what: str, call: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """``call()``, tried again on transient errors; ``what`` (an operation and URL) names it in the error."""
    policy = policy or DEFAULT
    start = time.monotonic()
    for attempt in range(policy.attempts):
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            pause = policy.pause(attempt)
            if attempt + 1 == policy.attempts or time.monotonic() + pause - start >= policy.deadline_s:
                raise StorageUnavailableError(
                    f"{what} failed with transient errors ({attempt + 1} tries in {time.monotonic() - start:.0f} s; "
                    f"last: {type(exc).__name__}: {str(exc)[:300]}); the object store is down, throttling or unreachable. A save that "
                    "hits this commits nothing (the previous checkpoint stays); retry once the store answers"
                ) from exc
            time.sleep(pause)
    raise AssertionError("unreachable: the loop returns or raises")
