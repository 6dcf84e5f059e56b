"""Which gcsfs client a ``gs://`` URL gets (``storage/remote.py``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("gcsfs")

_CLIENT = (
    "import sys, gcsfs; from shardstore.storage.remote import FsspecStorage; "
    "fs = FsspecStorage(sys.argv[1], {'token': 'anon', **eval(sys.argv[2])})._fs; "
    "print(type(fs).__module__, type(fs).__name__, gcsfs.GCSFileSystem.__name__)"
)


def _client(url: str, options: str) -> tuple[str, str, str]:
    """(module, class) of the client made for ``url``, and gcsfs's default class, in a fresh interpreter
    with gcsfs's defaults (its extended, layout-probing client on unless the environment turns it off)."""
    env = {k: v for k, v in os.environ.items() if k != "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"}
    done = subprocess.run([sys.executable, "-c", _CLIENT, url, options], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    module, name, default = done.stdout.split()
    return module, name, default


def test_a_custom_endpoint_gets_the_plain_client_that_asks_nothing_of_googles_control_api():
    # The extended client's bucket-layout lookup waits 60 s on such endpoints, on every call.
    assert _client("gs://bkt/ckpt", "{'endpoint_url': 'http://127.0.0.1:9'}")[:2] == ("gcsfs.core", "GCSFileSystem")


def test_googles_own_endpoint_keeps_gcsfs_default_client():
    _, name, default = _client("gs://bkt/ckpt", "{}")
    assert name == default
