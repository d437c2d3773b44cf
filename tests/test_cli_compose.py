"""docker-compose.yml and docker/: the services' commands are real `loraserve` command lines."""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

from clients.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _subst(s: str) -> str:
    """Compose-style ${VAR:-default} -> default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", s)


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_dependencies(compose):
    s = compose["services"]
    assert {"redis", "minio", "minio-init", "adapter-store", "engine", "example-register"} <= set(s)
    assert s["adapter-store"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert s["adapter-store"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert s["engine"]["depends_on"]["adapter-store"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing local/loraserve" in " ".join(s["minio-init"]["command"])
    assert s["adapter-store"]["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    dev = s["engine"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    for name in ("redis", "minio", "adapter-store", "engine"):
        assert "healthcheck" in s[name], name
    assert s["example-register"]["profiles"] == ["example"]


@pytest.mark.parametrize("service,command", [("adapter-store", "store"), ("engine", "serve")])
def test_service_commands_parse(compose, service, command):
    argv = [_subst(a) for a in compose["services"][service]["command"]]
    assert argv[0] == command
    args = build_parser(argv).parse_args(argv)
    assert args.command == command
    if service == "engine":
        assert args.store_target == "adapter-store:50052" and args.redis_url == "redis://redis:6379"
        assert args.model.startswith("/models/") and args.host == "0.0.0.0"
    else:
        assert args.object_store == "s3://loraserve/adapters" and args.port == 50052


def test_healthchecks_and_bench_parse(compose):
    for name in ("adapter-store", "engine"):
        test = compose["services"][name]["healthcheck"]["test"]
        assert test[:2] == ["CMD", "loraserve"]
        args = build_parser(test[2:]).parse_args(test[2:])
        assert args.command == "health"
    argv = compose["services"]["bench"]["command"]
    args = build_parser(argv).parse_args(argv)
    assert args.synthetic and args.n == [1, 10, 100]


def test_dockerfiles_and_script():
    for f in ("engine.Dockerfile", "store.Dockerfile"):
        text = (ROOT / "docker" / f).read_text()
        assert "FROM " in text and "pip install" in text and "HEALTHCHECK" in text
        assert 'ENTRYPOINT ["loraserve"]' in text
    script = ROOT / "docker" / "example-register.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    # the CLI lines the script runs parse
    for line in ("register /adapters/x/ --id x --replace --no-progress",
                 "register --id s --synthetic-rank 16 --synthetic-targets q_proj,k_proj --replace",
                 "list", "get x", "generate --adapter x --max-new-tokens 32 hi", "stats"):
        argv = ["--target", "engine:50051", "--store-target", "adapter-store:50052"] + line.split()
        build_parser(argv).parse_args(argv)


def test_docker_compose_config():
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        cmd = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        cmd = ["docker-compose"]
    else:
        pytest.skip("no docker compose here (YAML checked above)")
    p = subprocess.run(cmd + ["-f", str(ROOT / "docker-compose.yml"), "--profile", "example", "config", "-q"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
