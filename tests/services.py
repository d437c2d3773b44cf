"""Real backing services as pytest fixtures (thin wrappers over adapter_store/services.py).

Fixtures:
  redis_server   (session) a private redis-server: .url, .port, .restart(), .stop(), .start(), .kill()
                 Shared by the whole session: do not stop it; use fresh_redis for fault tests, and a
                 unique key namespace (see redis_namespace) or keys of your own.
  fresh_redis    (function) a private redis-server only this test uses (safe to kill/restart)
  redis_namespace(function) a unique key namespace string for Metadata(namespace=...)
  s3_server      (session) SeaweedFS S3 on loopback: .endpoint, .env (AWS_* variables), .client();
                 while it runs, AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
                 AWS_DEFAULT_REGION point at it, so open_store("s3://bucket/prefix") just works.
  s3_bucket      (function) a fresh bucket name on s3_server
"""
from __future__ import annotations

import os
import uuid

import pytest

from adapter_store.services import RedisServer, SeaweedS3

__all__ = ["redis_server", "fresh_redis", "redis_namespace", "s3_server", "s3_bucket"]


@pytest.fixture(scope="session")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def fresh_redis():
    """A private server a test may kill or restart."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_namespace():
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.close()


@pytest.fixture
def s3_bucket(s3_server):
    return f"test-{uuid.uuid4().hex[:16]}"


class StoreThread:
    """An AdapterStore grpc.aio server on its own event loop thread, for sync tests.

    StoreThread(servicer) -> .address ("127.0.0.1:PORT"), .port, .stop().
    """

    def __init__(self, servicer, port: int = 0):
        import asyncio
        import threading

        from adapter_store.main import start_store_server

        self.servicer = servicer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="store-loop", daemon=True)
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(start_store_server(servicer, port), self.loop)
        self.server, self.port = fut.result(30)
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        import asyncio

        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


__all__ += ["StoreThread"]


class LostReplyProxy:
    """A loopback TCP proxy in front of a real redis-server that, when armed, cuts the connection
    right after the server answered the next EVALSHA: the script ran, its reply never arrives,
    and redis-py retries the command (as after a network blip)."""

    def __init__(self, upstream_port: int):
        import socket
        import threading

        self.upstream, self.armed, self.cut = upstream_port, False, 0
        self._listen = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._listen.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self._listen.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            pending = {"script": False}
            threading.Thread(target=self._up, args=(client, server, pending), daemon=True).start()
            threading.Thread(target=self._down, args=(client, server, pending), daemon=True).start()

    def _up(self, client, server, pending) -> None:
        try:
            while data := client.recv(65536):
                if self.armed and b"EVALSHA" in data.upper():
                    pending["script"] = True
                server.sendall(data)
        except OSError:
            pass

    def _down(self, client, server, pending) -> None:
        import socket

        try:
            while data := server.recv(65536):
                if pending["script"] and self.armed and not data.startswith(b"-"):
                    self.armed, pending["script"] = False, False
                    self.cut += 1
                    for s in (client, server):
                        s.shutdown(socket.SHUT_RDWR)
                        s.close()
                    return
                client.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._listen.close()
