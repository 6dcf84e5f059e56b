import pytest

from tests.buckets.servers import Servers
from tests.ranks import close_pools


@pytest.fixture(scope="session", autouse=True)
def _stop_rank_pools():
    """Worker pools live for the whole session (spawning ranks per test would dominate CI time)."""
    yield
    close_pools()


@pytest.fixture(scope="session")
def bucket_servers():
    """S3, GCS and Azure servers on 127.0.0.1, each started by the first test that needs it, stopped at
    the end of the session (one server per kind per session keeps the suite fast)."""
    servers = Servers()
    yield servers
    servers.stop_all()
