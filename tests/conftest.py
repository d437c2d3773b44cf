from tests.services import fresh_redis, redis_namespace, redis_server, s3_bucket, s3_server  # noqa: F401

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    """`loraserve serve` in-process on embedded defaults (demo model, private redis-server,
    blobs under a data dir) with two registered adapters. Has .target, .adapters, .engine."""
    from server.demo import DEMO_CONFIG
    from tests.helpers import ServerThread, make_adapter, wait_for

    d = tmp_path_factory.mktemp("live")
    a = make_adapter(d / "alpha", DEMO_CONFIG, 8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], seed=11)
    b = make_adapter(d / "beta", DEMO_CONFIG, 16, 16, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], seed=12)
    srv = ServerThread(["--data-dir", str(d / "data"), "--adapter", f"alpha={a}", "--adapter", f"beta={b}",
                        "--pool-mb", "32"])
    srv.adapters = ["alpha", "beta"]
    srv.adapter_dirs = {"alpha": a, "beta": b}
    from adapter_store.metadata import Metadata
    meta = Metadata(srv.args.redis_url)
    assert wait_for(lambda: all(meta.exists(x) for x in srv.adapters), timeout=30), "adapters not registered"
    yield srv
    srv.stop()


@pytest.fixture
def server(live_server):
    """The shared live server, by the name the CLI and client tests use."""
    return live_server
