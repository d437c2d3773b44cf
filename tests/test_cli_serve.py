"""`loraserve serve` and `loraserve store` through the CLI's delegation, as real processes,
then client subcommands against them; and the upload progress bar on a TTY-like stderr."""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from clients.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv, tmp_path, name):
    log = open(tmp_path / f"{name}.log", "w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    return proc, log


def _stop(proc, log):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    log.close()


def _wait_healthy(target: str, proc, timeout: float = 90) -> None:
    from clients.client import Client, LoraServeError

    deadline = time.monotonic() + timeout
    with Client(target, timeout=2) as c:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "server exited"
            try:
                if c.health() == "SERVING":
                    return
            except LoraServeError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"{target} not healthy")


def test_serve_subcommand(tmp_path, capsys):
    port = _free_port()
    proc, log = _start(["serve", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--pool-mb", "16",
                        "--token", "s3cret"], tmp_path, "serve")
    try:
        target = f"127.0.0.1:{port}"
        _wait_healthy(target, proc)
        assert main(["--target", target, "health"]) == 0
        reg = ["register", "--id", "s1", "--synthetic-rank", "4", "--synthetic-targets", "q_proj,v_proj"]
        # the control plane wants the bearer token
        assert main(["--target", target, *reg]) == 1
        assert capsys.readouterr().err.startswith("error: UNAUTHENTICATED: ")
        assert main(["--target", target, "--token", "wrong", *reg]) == 1
        assert capsys.readouterr().err.startswith("error: UNAUTHENTICATED: ")
        assert main(["--target", target, "--token", "s3cret", *reg]) == 0
        assert main(["--target", target, "generate", "--adapter", "s1", "--max-new-tokens", "3", "--ignore-eos",
                     "hello"]) == 0
        err = capsys.readouterr().err
        assert "3 completion tokens" in err
        # a second server on the same port is refused (gRPC's default SO_REUSEPORT would have let
        # it take half the connections), and leaves nothing running
        second = _run_serve(["--port", str(port), "--data-dir", str(tmp_path / "data2")])
        assert second.returncode != 0 and "cannot bind 127.0.0.1:" in second.stderr, second.stderr
        assert main(["--target", target, "health"]) == 0
    finally:
        _stop(proc, log)
    assert proc.returncode in (0, -signal.SIGTERM), (tmp_path / "serve.log").read_text()


def _run_serve(argv):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
    return subprocess.run([sys.executable, "-m", "clients.cli", "serve", *argv], capture_output=True, text=True,
                          timeout=180, env=env)


def _processes_in(directory) -> list[int]:
    """Processes whose working directory is under directory (a private redis-server runs in
    its data dir; its command line says only its port)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd").startswith(str(directory)):
                found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_a_failed_start_stops_the_private_redis_it_started(tmp_path):
    """The model folder is read after the embedded store (and its redis-server child) started:
    a bad --model must not leave that child behind."""
    data = tmp_path / "data"
    r = _run_serve(["--port", str(_free_port()), "--data-dir", str(data), "--model", str(tmp_path / "no-model")])
    assert r.returncode == 2 and "no-model/config.json" in r.stderr, r.stderr
    assert (data / "redis").is_dir()          # it did start one
    time.sleep(0.5)
    assert _processes_in(data) == []


def test_serve_refuses_values_it_cannot_run_with():
    for argv, msg in ((["--pool-mb", "-5"], "--pool-mb must be 0 or more, got -5"),
                      (["--max-num-seqs", "0"], "--max-num-seqs must be 1 or more, got 0"),
                      (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1], got 1.5")):
        r = _run_serve([*argv, "--port", "0"])
        assert r.returncode == 1 and msg in r.stderr, (argv, r.stderr)


def test_store_subcommand(tmp_path, capsys):
    port = _free_port()
    proc, log = _start(["store", "--port", str(port), "--data-dir", str(tmp_path / "store")], tmp_path, "store")
    try:
        target = f"127.0.0.1:{port}"
        _wait_healthy(target, proc)
        capsys.readouterr()
        assert main(["--target", target, "list", "--json"]) == 0
        assert capsys.readouterr().out.strip() == "[]"
        # the store alone serves no Inference
        rc = main(["--target", target, "--timeout", "5", "generate", "x"])
        assert rc == 1 and capsys.readouterr().err.startswith("error: UNIMPLEMENTED: ")
    finally:
        _stop(proc, log)


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes of the TCP listeners on `port` (Linux /proc/net)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for line in open(table).read().splitlines()[1:]:
                f = line.split()
                if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":
                    inodes.add(f[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[8:-1])
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_store_workers_share_the_port_and_exit_with_it(tmp_path):
    """`loraserve store --workers 2`: a second serving process listens on the same port; fetches
    over many connections (spread over both by the kernel) all return the same bytes; stopping
    the store stops the worker too."""
    from adapter_store.client import StoreClient
    from tests.helpers import make_model

    model = make_model(tmp_path / "model")
    port = _free_port()
    proc, log = _start(["store", "--port", str(port), "--data-dir", str(tmp_path / "store"), "--workers", "2",
                        "--base-model", f"tiny={model}"], tmp_path, "store")
    try:
        target = f"127.0.0.1:{port}"
        _wait_healthy(target, proc)
        deadline = time.monotonic() + 60
        while True:     # the worker starts after the first process serves
            kids = [int(k) for k in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
            workers = [k for k in kids if b"spawn_main" in open(f"/proc/{k}/cmdline", "rb").read()]
            if workers and _socket_inodes(workers[0]) & _listening_inodes(port):
                break
            assert time.monotonic() < deadline, f"no second process listens on {port}: {kids}"
            time.sleep(0.3)
        assert len(workers) == 1
        with StoreClient(target) as c:
            c.register_synthetic("w1", 8, ["q_proj", "v_proj"], seed=3, base_model="tiny")
            _, cfg, weights = c.fetch("w1")
        assert len(weights) > 0
        for _ in range(8):      # a new channel, so a new connection, each time
            with StoreClient(target) as c:
                assert c.fetch("w1")[1:] == (cfg, weights)
    finally:
        _stop(proc, log)
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{workers[0]}") and time.monotonic() < deadline:
        time.sleep(0.2)
    stat = open(f"/proc/{workers[0]}/stat").read() if os.path.exists(f"/proc/{workers[0]}") else ""
    assert not stat or stat.rsplit(")", 1)[1].split()[0] == "Z", "the store's worker outlived it"


def test_serve_subcommand_bad_flag_is_reported(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--dtype", "float8"])
    assert e.value.code == 2
    assert "error: INVALID_ARGUMENT: argument --dtype" in capsys.readouterr().err


def test_serve_stream_interval_below_one_is_refused():
    r = subprocess.run([sys.executable, "-m", "clients.cli", "serve", "--stream-interval", "0", "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--stream-interval must be 1 or more, got 0" in r.stderr


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_register_progress_bar_on_a_tty(live_server, tmp_path, monkeypatch):
    from clients.client import Client
    from tests.test_client import adapter_folder

    with Client(live_server.target) as c:
        folder = adapter_folder(c, live_server, tmp_path / "a")
        fake = _TTY()
        monkeypatch.setattr(sys, "stderr", fake)
        info = c.register_adapter(folder, "progress-tty", chunk_bytes=4096)
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)
        assert info.adapter_id == "progress-tty"
        assert "register progress-tty" in fake.getvalue()
        quiet = _TTY()
        monkeypatch.setattr(sys, "stderr", quiet)
        c.register_adapter(folder, "progress-tty", replace=True, progress=False)
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)
        assert quiet.getvalue() == ""
        assert c.delete_adapter("progress-tty")


def test_simple_progress_bar_without_tqdm(monkeypatch):
    import builtins

    from clients import client as cl

    real_import = builtins.__import__

    def no_tqdm(name, *a, **kw):
        if name == "tqdm":
            raise ImportError("no tqdm")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    fake = _TTY()
    monkeypatch.setattr(sys, "stderr", fake)
    bar = cl._progress(True, 2_000_000, "up")
    bar.update(1_000_000)
    bar.close()
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    assert " 50.0% 1.0/2.0 MB" in fake.getvalue()
    assert cl._progress(True, 10, "x") is None          # real stderr under pytest is not a TTY
