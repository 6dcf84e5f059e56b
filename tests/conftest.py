import pytest

from tests.ranks import close_pools


@pytest.fixture(scope="session", autouse=True)
def _stop_rank_pools():
    """Worker pools live for the whole session (spawning ranks per test would dominate CI time)."""
    yield
    close_pools()
