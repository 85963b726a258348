"""Redis going away and coming back, credentials (ACL user, password) and TLS (rediss://)."""
from __future__ import annotations

import pytest

from kvcompile.store import StoreUnavailableError, open_store
from redis_server import RedisServer, TlsProxy, self_signed_certificate


@pytest.fixture
def own_server(redis_server, tmp_path):
    """A server of this test's own, which it may stop and restart on the same port."""
    server = RedisServer(tmp_path / "own").start()
    yield server
    server.stop()


def test_server_stopped_then_restarted_same_store_object(own_server):
    store = open_store(own_server.url)
    store.put("before/stop", b"kv", {})
    own_server.stop()
    for action, what in ((lambda: store.get("before/stop"), "reading 1 entry"),
                         (lambda: store.put("during/stop", b"kv", {}), "writing during/stop"),
                         (lambda: store.get_many(["a/1", "a/2"]), "reading 2 entries")):
        with pytest.raises(StoreUnavailableError, match=f"redis store redis://127.0.0.1:{own_server.port}/0 is "
                                                        f"unreachable while {what}") as error:
            action()
        assert "\n" not in str(error.value) and error.value.exit_code == 4
    own_server.start()  # same port, empty (no persistence); no new store, no new process
    assert store.get("before/stop") is None
    store.put("after/restart", b"kv", {})
    assert store.get("after/restart") == b"kv" and store.stats()["entries"] == 1
    store.close()


def test_acl_user_and_password(own_server):
    own_server.command("ACL", "SETUSER", "kv", "on", ">s3cret-pass", "~kvcompile:*", "+@all")
    own_server.command("CONFIG", "SET", "requirepass", "default-pass")
    host = f"127.0.0.1:{own_server.port}"
    with open_store(f"redis://kv:s3cret-pass@{host}/0") as store:
        store.put("acl/ok", b"kv", {})
        assert store.get("acl/ok") == b"kv"
    with open_store(f"redis://:default-pass@{host}/0") as store:
        assert store.get("acl/ok") == b"kv"
    with open_store(f"redis://kv:wrong@{host}/0") as store:
        with pytest.raises(StoreUnavailableError, match="refused the credentials") as error:
            store.get("acl/ok")
        assert "wrong" not in str(error.value)  # the password is never printed
    with open_store(f"redis://kv:s3cret-pass@{host}/0?prefix=elsewhere:") as store:
        with pytest.raises(StoreUnavailableError, match="refused"):  # the ACL allows kvcompile:* only
            store.put("acl/no", b"kv", {})


def test_tls(redis_url, redis_server, tmp_path):
    pair = self_signed_certificate(tmp_path)
    if pair is None:
        pytest.skip("no openssl to make a certificate")
    proxy = TlsProxy(redis_server.port, *pair)
    try:
        url = f"rediss://127.0.0.1:{proxy.port}/0?ssl_ca_certs={pair[0]}&ssl_cert_reqs=required"
        with open_store(url) as store:
            assert store.url.startswith("rediss://")
            store.put("tls/entry", b"kv" * 100_000, {})
            assert store.get("tls/entry") == b"kv" * 100_000
        with open_store(f"rediss://127.0.0.1:{proxy.port}/0?ssl_cert_reqs=required") as untrusting:
            with pytest.raises(StoreUnavailableError, match="unreachable"):  # certificate not trusted
                untrusting.get("tls/entry")
    finally:
        proxy.close()
