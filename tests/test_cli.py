"""The `loraserve` CLI: --help of every subcommand, env-var defaults, error output, and every
client subcommand (and `bench`) against a real server on loopback (``live_server``)."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import uuid

import pytest

from clients import cli
from clients.cli import apply_env_defaults, build_parser, env_name, main
from clients.workload import WorkloadSpec, generate_workload

SUBCOMMANDS = ["serve", "store", "register", "list", "get", "delete", "generate", "load", "unload", "stats",
               "health", "bench", "engines"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("LORASERVE_"):
            monkeypatch.delenv(k)


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- help

def test_main_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in SUBCOMMANDS:
        assert f"    {cmd}" in out
    assert "examples:" in out and "LORASERVE_TARGET" in out


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: loraserve {cmd}" in out
    assert "example" in out                      # every subcommand shows how to use it
    if cmd not in ("serve", "store"):
        assert "[env LORASERVE_" in " ".join(out.split()) or cmd in ("get", "delete", "load", "unload")
    if cmd == "generate":
        for flag in ("--adapter", "--max-new-tokens", "--temperature", "--seed", "--top-p", "--top-k", "--stop",
                     "--ignore-eos", "--logprobs", "--token-ids"):
            assert flag in out
    if cmd == "bench":
        for flag in ("--synthetic", "--adapters", "--base-only", "--trace", "--n", "--alpha", "--rate", "--cv",
                     "--duration", "--input-range", "--output-range", "--slo", "--out", "--compare", "--quiet"):
            assert flag in out
    if cmd == "serve":
        assert "--model" in out and "--port" in out


def test_help_does_not_import_torch():
    code = ("import sys\nfrom clients.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "try:\n    main(['generate', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "NO-TORCH" in p.stderr


# ---------------------------------------------------------------------------------------- env defaults

def _parse(argv, env):
    p = build_parser(argv)
    for sub in cli._walk(p):
        apply_env_defaults(sub, env, skip=() if sub.get_default("_delegate") else cli.SERVER_ONLY_ENV)
    return p.parse_args(argv)


def test_env_name():
    assert env_name("--max-new-tokens") == "LORASERVE_MAX_NEW_TOKENS"
    assert env_name("--target") == "LORASERVE_TARGET"


def test_env_var_defaults():
    env = {"LORASERVE_TARGET": "10.0.0.1:6000", "LORASERVE_TOKEN": "t0k", "LORASERVE_MAX_NEW_TOKENS": "7",
           "LORASERVE_TEMPERATURE": "0.5", "LORASERVE_IGNORE_EOS": "yes", "LORASERVE_ADAPTER": "sql=/adapters/sql",
           "LORASERVE_TOKEN_IDS": "1,2,3", "LORASERVE_STOP": "a, b"}
    a = _parse(["generate"], env)
    assert a.target == "10.0.0.1:6000" and a.token == "t0k"
    assert a.max_new_tokens == 7 and a.temperature == 0.5 and a.ignore_eos is True
    assert a.token_ids == [1, 2, 3] and a.stop == ["a, b"]     # a stop string keeps its comma
    # LORASERVE_ADAPTER is serve's NAME=DIR list: generate does not take it as an adapter id
    assert a.adapter == ""
    # an explicit flag wins over the environment
    a = _parse(["--target", "h:1", "generate", "--max-new-tokens", "9", "x"], env)
    assert a.target == "h:1" and a.max_new_tokens == 9
    # booleans read false too
    assert _parse(["generate", "x"], {"LORASERVE_IGNORE_EOS": "0"}).ignore_eos is False
    # a required flag is satisfied by its variable
    a = _parse(["register", "dir"], {"LORASERVE_ID": "from-env"})
    assert a.adapter_id == "from-env"
    # bench flags with their own types
    a = _parse(["bench"], {"LORASERVE_N": "1,10", "LORASERVE_INPUT_RANGE": "4,9", "LORASERVE_RATE": "3",
                           "LORASERVE_SYNTHETIC": "true"})
    assert a.n == [1, 10] and a.input_range == (4, 9) and a.rate == 3.0 and a.synthetic is True


def test_server_env_lists_and_client_flags_of_the_same_name(capsys):
    env = {"LORASERVE_ADAPTER": "sql=/a/sql,chat=/a/chat", "LORASERVE_BASE_MODEL": "m1=/models/a,m2=/models/b",
           "LORASERVE_STREAM_INTERVAL": "4", "LORASERVE_NO_WARMUP": "yes"}
    a = _parse(["serve"], env)
    assert a.adapter == ["sql=/a/sql", "chat=/a/chat"] and a.stream_interval == 4 and a.no_warmup is True
    assert _parse(["serve"], {"LORASERVE_ADAPTER": "a=/x,y\nb=/z"}).adapter == ["a=/x,y", "b=/z"]   # one a line
    assert _parse(["store"], env).base_model == ["m1=/models/a", "m2=/models/b"]
    # the client commands' --adapter / --base-model mean an adapter id and a name filter
    assert _parse(["generate", "x"], env).adapter == ""
    assert _parse(["list"], env).base_model == "" and _parse(["register", "d", "--id", "i"], env).base_model == ""
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "LORASERVE_MAX_NEW_TOKENS" in help_text and "LORASERVE_ADAPTER" not in help_text


@pytest.mark.parametrize("module", ["server.app", "adapter_store.main"])
def test_bad_server_env_value_is_a_usage_error(module, monkeypatch, capsys):
    import importlib
    monkeypatch.setenv("LORASERVE_PORT", "fifty")
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--help"])
    assert e.value.code == 2
    assert "LORASERVE_PORT='fifty'" in capsys.readouterr().err


def test_bad_serve_env_value_through_main(capsys, monkeypatch):
    monkeypatch.setenv("LORASERVE_STREAM_INTERVAL", "abc")
    rc, out, err = run(capsys, "serve", "--help")
    assert rc == 2 and err.startswith("error: INVALID_ARGUMENT: LORASERVE_STREAM_INTERVAL='abc'")
    assert "Traceback" not in err


def test_env_defaults_through_main(capsys, monkeypatch):
    monkeypatch.setenv("LORASERVE_TARGET", f"127.0.0.1:{_free_port()}")
    monkeypatch.setenv("LORASERVE_TIMEOUT", "3")
    rc, out, err = run(capsys, "stats")
    assert rc == 1 and err.startswith("error: UNAVAILABLE: ")


def test_bad_env_value_is_reported(capsys, monkeypatch):
    monkeypatch.setenv("LORASERVE_MAX_NEW_TOKENS", "lots")
    rc, out, err = run(capsys, "generate", "hi")
    assert rc == 2
    assert err.startswith("error: INVALID_ARGUMENT: LORASERVE_MAX_NEW_TOKENS='lots'")
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------- errors

def test_unreachable_server_error_format(capsys):
    rc, out, err = run(capsys, "--target", f"127.0.0.1:{_free_port()}", "--timeout", "3", "get", "x")
    assert rc == 1
    assert err.startswith("error: UNAVAILABLE: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_usage_errors(capsys):
    rc, out, err = run(capsys, "generate")
    assert rc == 2 and err.startswith("error: INVALID_ARGUMENT: a prompt is required")
    rc, out, err = run(capsys, "generate", "x", "--token-ids", "1,2")
    assert rc == 2 and "not both" in err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--token-ids", "1,x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: loraserve generate") and "error: INVALID_ARGUMENT: argument --token-ids" in err
    rc, out, err = run(capsys, "register", "--id", "x", "/nonexistent/dir")
    assert rc == 1 and err.startswith("error: INVALID_ARGUMENT: ")


def test_no_command_prints_help(capsys):
    rc, out, err = run(capsys)
    assert rc == 2 and "usage: loraserve" in err


def test_errors_from_the_server(server, capsys):
    t = ["--target", server.target]
    missing = f"missing-{uuid.uuid4().hex[:6]}"
    rc, out, err = run(capsys, *t, "get", missing)
    assert rc == 1 and err.startswith("error: NOT_FOUND: ") and "Traceback" not in err
    rc, out, err = run(capsys, *t, "generate", "--adapter", missing, "hi")
    assert rc == 1 and err.startswith("error: NOT_FOUND: ")
    rc, out, err = run(capsys, *t, "generate", "--temperature", "-1", "hi")
    assert rc == 1 and err.startswith("error: INVALID_ARGUMENT: ")
    rc, out, err = run(capsys, *t, "delete", missing)
    assert rc == 1 and err.startswith("error: NOT_FOUND: ")


def test_console_script_exit_status(server):
    p = subprocess.run([sys.executable, "-m", "clients.cli", "--target", server.target, "get", "no-such-adapter"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.startswith("error: NOT_FOUND: ") and "Traceback" not in p.stderr


# ---------------------------------------------------------------------------------------- commands

def test_health_and_stats(server, capsys):
    t = ["--target", server.target]
    rc, out, err = run(capsys, *t, "health")
    assert rc == 0 and out.strip() == "SERVING"
    rc, out, err = run(capsys, *t, "generate", "--max-new-tokens", "3", "--token-ids", "5,6,7")
    assert rc == 0, err
    rc, out, err = run(capsys, *t, "stats")
    assert rc == 0 and "pool pages" in out and "running" in out and "adapter loads" in out
    assert "decode steps" in out and "distinct adapters" in out
    rc, out, err = run(capsys, *t, "stats", "--json")
    s = json.loads(out)
    assert rc == 0 and s["pool"]["total_pages"] > 0 and s["model"]
    assert s["weight_bytes"] > 0 and s["decode_steps"] >= 2 and s["decode_tokens"] >= s["decode_steps"]
    assert s["pool"]["adapter_dtype"] == s["dtype"]
    rc, out, err = run(capsys, *t, "stats")
    assert f"adapter rows {s['dtype']}" in out     # rows in the model's dtype unless --adapter-dtype int8
    assert "engine time" in out and ("GPU busy" in out) == s["device"].startswith("cuda")   # no GPU, no GPU figure


def test_int8_adapter_rows_from_the_serve_flag_to_stats(tmp_path, capsys):
    """`serve --adapter-dtype int8`: the pool stores adapter rows as int8, an adapter's request
    generates through them, and `stats` (text and JSON) says how rows are stored."""
    from server.demo import DEMO_CONFIG
    from tests.helpers import ServerThread, make_adapter

    a = make_adapter(tmp_path / "alpha", DEMO_CONFIG, 8, 16, ["q_proj", "v_proj"], seed=21)
    srv = ServerThread(["--data-dir", str(tmp_path / "data"), "--adapter", f"alpha={a}", "--pool-mb", "16",
                        "--adapter-dtype", "int8"])
    try:
        t = ["--target", srv.target]
        rc, out, err = run(capsys, *t, "generate", "--adapter", "alpha", "--max-new-tokens", "3", "--token-ids", "5,6,7")
        assert rc == 0, err
        assert srv.engine.pool.quantized and srv.engine.adapters.resident["alpha"].pages > 0
        rc, out, err = run(capsys, *t, "stats")
        assert rc == 0 and "adapter rows int8 with a scale per row" in out
        rc, out, err = run(capsys, *t, "stats", "--json")
        assert json.loads(out)["pool"]["adapter_dtype"] == "int8"
    finally:
        srv.stop()


def test_list_get(server, capsys):
    t = ["--target", server.target]
    rc, out, err = run(capsys, *t, "list")
    assert rc == 0 and out.splitlines()[0].startswith("ADAPTER")
    for a in server.adapters:
        assert any(line.split()[0] == a for line in out.splitlines()[1:])
    rc, out, err = run(capsys, *t, "list", "--json", "--page-size", "1")
    ids = [a["adapter_id"] for a in json.loads(out)]
    assert rc == 0 and set(server.adapters) <= set(ids)
    rc, out, err = run(capsys, *t, "get", server.adapters[0])
    assert rc == 0 and server.adapters[0] in out and "rank" in out and "target_modules" in out
    rc, out, err = run(capsys, *t, "get", server.adapters[0], "--json")
    d = json.loads(out)
    assert d["adapter_id"] == server.adapters[0] and d["rank"] > 0


def test_register_delete(server, capsys, tmp_path):
    from clients.client import Client
    from tests.test_client import adapter_folder

    with Client(server.target) as c:
        folder = adapter_folder(c, server, tmp_path / "a")
    t = ["--target", server.target]
    aid = f"cli-{uuid.uuid4().hex[:6]}"
    rc, out, err = run(capsys, *t, "register", str(folder), "--id", aid)
    assert rc == 0 and out.startswith(f"registered {aid}: rank ")
    rc, out, err = run(capsys, *t, "register", str(folder), "--id", aid)
    assert rc == 1 and err.startswith("error: ALREADY_EXISTS: ")
    rc, out, err = run(capsys, *t, "register", str(folder), "--id", aid, "--replace", "--json", "--no-progress")
    assert rc == 0 and json.loads(out)["adapter_id"] == aid
    rc, out, err = run(capsys, *t, "generate", "--adapter", aid, "--max-new-tokens", "3", "--ignore-eos", "hi")
    assert rc == 0
    rc, out, err = run(capsys, *t, "delete", aid)
    assert rc == 0 and out.strip() == f"deleted {aid}"
    syn = f"cli-syn-{uuid.uuid4().hex[:6]}"
    rc, out, err = run(capsys, *t, "register", "--id", syn, "--synthetic-rank", "8", "--synthetic-targets", "q_proj")
    assert rc == 0 and "rank 8" in out
    rc, out, err = run(capsys, *t, "delete", syn)
    assert rc == 0


def test_generate_streams_text(server, capsys):
    t = ["--target", server.target]
    rc, out, err = run(capsys, *t, "generate", "--adapter", server.adapters[0], "--max-new-tokens", "5",
                       "--ignore-eos", "Hello")
    assert rc == 0 and out.endswith("\n")
    assert "[finish: length, " in err and "5 completion tokens" in err
    rc, out, err = run(capsys, *t, "generate", "--token-ids", "5,6,7", "--max-new-tokens", "4", "--ignore-eos", "--json")
    lines = [json.loads(x) for x in out.splitlines()]
    assert rc == 0 and sum(len(x["token_ids"]) for x in lines) == 4
    assert lines[-1]["finished"] and lines[-1]["finish_reason"] == "length"
    assert lines[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4}
    rc, out, err = run(capsys, *t, "generate", "--logprobs", "--max-new-tokens", "3", "--ignore-eos",
                       "--temperature", "0.7", "--top-p", "0.9", "--top-k", "20", "--seed", "3", "--stop", "zzz", "Hi")
    assert rc == 0
    rows = [line.split("\t") for line in out.splitlines() if "\t" in line]
    assert len(rows) == 3 and all(float(lp) <= 1e-6 for _, lp in rows)


def test_generate_reads_stdin(server, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon a time"))
    rc, out, err = run(capsys, "--target", server.target, "generate", "--max-new-tokens", "2", "--ignore-eos", "-")
    assert rc == 0 and "2 completion tokens" in err


def test_load_unload(server, capsys):
    t = ["--target", server.target]
    aid = server.adapters[1]
    rc, out, err = run(capsys, *t, "load", aid)
    assert rc == 0 and out.startswith(f"loaded {aid} (") and "pages" in out
    rc, out, err = run(capsys, *t, "stats", "--json")
    assert aid in json.loads(out)["resident_adapters"]
    rc, out, err = run(capsys, *t, "unload", aid)
    assert rc == 0 and out.strip() == f"unloaded {aid}"


# ---------------------------------------------------------------------------------------- bench

SMALL = ["--rate", "40", "--max-requests", "6", "--input-range", "4,10", "--output-range", "2,5", "--quiet"]


def test_bench_existing_adapters(server, capsys, tmp_path):
    out_file = tmp_path / "r.json"
    rc, out, err = run(capsys, "--target", server.target, "bench", "--adapters", ",".join(server.adapters),
                       *SMALL, "--out", str(out_file), "--alpha", "0.5")
    assert rc == 0, err
    assert "req/s" in out and "loraserve" in out
    data = json.loads(out_file.read_text())
    (r,) = data["runs"]
    assert r["backend"] == "loraserve" and r["n"] == len(server.adapters)
    res = r["result"]
    assert res["num_requests"] == 6 and res["num_finished"] == 6, res["errors"]
    assert res["throughput"] > 0 and res["p50_first_token_latency"] > 0 and res["slo_attainment"] == 1.0
    assert r["config"]["alpha"] == 0.5 and r["config"]["workload"]["num_requests"] == 6


def test_bench_fails_when_no_request_finishes_or_the_out_folder_is_missing(server, capsys, tmp_path):
    # prompts past the server's length limit: every request gets INVALID_ARGUMENT
    rc, out, err = run(capsys, "--target", server.target, "bench", "--adapters", server.adapters[0], "--rate", "40",
                       "--max-requests", "3", "--input-range", "5000,5001", "--output-range", "2,3", "--quiet")
    assert rc == 1 and "failed with INVALID_ARGUMENT" in err and "every request failed in loraserve n=1" in err
    rc, out, err = run(capsys, "--target", server.target, "bench", "--adapters", server.adapters[0], *SMALL,
                       "--out", str(tmp_path / "missing" / "r.json"))
    assert rc == 2 and "does not exist" in err and out == ""       # refused before any request ran


def test_bench_synthetic_several_n_and_compare_base(server, capsys, tmp_path):
    out_file = tmp_path / "r.json"
    rc, out, err = run(capsys, "--target", server.target, "bench", "--synthetic", "--n", "1,3", "--ranks", "4,8",
                       "--targets", "q_proj,v_proj", *SMALL, "--out", str(out_file), "--compare", "base",
                       "--plot", str(tmp_path / "p.png"))
    assert rc == 0, err
    runs = json.loads(out_file.read_text())["runs"]
    assert [(r["backend"], r["n"]) for r in runs] == [("loraserve", 1), ("base", 1), ("loraserve", 3), ("base", 3)]
    assert all(r["result"]["num_finished"] == 6 for r in runs)
    # the engine's view of each run: base runs read no adapter rows; one adapter is at most one per step
    eng = [r["engine"] for r in runs]
    assert all(e["decode_steps"] > 0 and e["mean_batch"] >= 1 for e in eng)
    assert eng[1]["mean_distinct_adapters"] == 0 == eng[3]["mean_distinct_adapters"] == eng[1]["adapter_GB_per_step"]
    assert 0 < eng[0]["mean_distinct_adapters"] <= 1 and eng[0]["adapter_bytes_vs_weights"] > 0
    # a tiny adapter's bytes, exact (GB rounded to 3 places once read 0 here)
    assert eng[0]["adapter_bytes_per_step"] > 0 and eng[1]["adapter_bytes_per_step"] == 0
    assert 0 < eng[2]["mean_distinct_adapters"] <= min(3, eng[2]["mean_batch"])
    assert "loraserve/base" in out
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "p.png").exists()
    except ImportError:
        assert "skipping the plot" in err
    from clients.client import Client
    with Client(server.target) as c:
        infos = {a.adapter_id: a for a in c.list_adapters()}
        assert infos["bench-00000"].rank == 4 and infos["bench-00001"].rank == 8 and infos["bench-00002"].rank == 4
        assert infos["bench-00001"].synthetic
    # a second run of the same setting reuses the registered adapters (no new version) ...
    rc, out, err = run(capsys, "--target", server.target, "bench", "--synthetic", "--n", "2", "--ranks", "4,8",
                       "--targets", "q_proj,v_proj", *SMALL)
    assert rc == 0, err
    with Client(server.target) as c:
        assert c.get_adapter("bench-00001").version == infos["bench-00001"].version
    # ... and a run of another setting (S1 after S2) replaces them rather than serving the old ranks
    rc, out, err = run(capsys, "--target", server.target, "bench", "--synthetic", "--n", "2", "--ranks", "16",
                       "--targets", "q_proj,k_proj,v_proj", *SMALL)
    assert rc == 0, err
    with Client(server.target) as c:
        now = c.get_adapter("bench-00001")
        assert now.rank == 16 and sorted(now.target_modules) == ["k_proj", "q_proj", "v_proj"]
        assert now.version > infos["bench-00001"].version


def test_bench_base_only_and_trace(server, capsys, tmp_path):
    trace = tmp_path / "t.jsonl"
    rc, out, err = run(capsys, "--target", server.target, "bench", "--base-only", *SMALL, "--save-trace", str(trace))
    assert rc == 0, err
    assert "base" in out
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert len(lines) == 6 and all(x["adapter_id"] == "" for x in lines)
    # replay with adapters
    trace.write_text("".join(json.dumps({"timestamp": 0.01 * i, "adapter_id": server.adapters[i % 2],
                                         "input_len": 5, "output_len": 3}) + "\n" for i in range(5)))
    out_file = tmp_path / "r.json"
    rc, out, err = run(capsys, "--target", server.target, "bench", "--trace", str(trace), "--quiet", "--out", str(out_file),
                       "--vocab-size", "50")
    assert rc == 0, err
    (r,) = json.loads(out_file.read_text())["runs"]
    assert r["result"]["num_finished"] == 5 and r["result"]["completion_tokens"] == 15


def test_bench_detects_the_vocabulary(server):
    import asyncio

    from clients.bench import detect_vocab_size
    from clients.client import AsyncClient

    vocab = server.engine.cfg.vocab_size if hasattr(server, "engine") else None

    async def main():
        async with AsyncClient(server.target) as ac:
            return await detect_vocab_size(ac), await detect_vocab_size(ac, upper=8)

    got, small = asyncio.run(main())
    assert small == min(8, vocab or 8)
    if vocab is not None:
        assert got == min(256, vocab)


def test_bench_argument_errors(capsys, server):
    rc, out, err = run(capsys, "--target", server.target, "bench", *SMALL)
    assert rc == 2 and err.startswith("error: INVALID_ARGUMENT: choose adapters")
    rc, out, err = run(capsys, "--target", server.target, "bench", "--synthetic", "--compare", "peft", *SMALL)
    assert rc == 2 and "--model" in err
    rc, out, err = run(capsys, "--target", server.target, "bench", "--adapters", "no-such-adapter", *SMALL)
    assert rc == 1 and err.startswith("error: NOT_FOUND: ")     # checked before the run starts


def test_store_target_flag(server, capsys):
    dead = f"127.0.0.1:{_free_port()}"
    rc, out, err = run(capsys, "--target", dead, "--store-target", server.target, "get", server.adapters[0])
    assert rc == 0 and server.adapters[0] in out
    rc, out, err = run(capsys, "--target", dead, "--store-target", server.target, "--timeout", "3", "stats")
    assert rc == 1 and err.startswith("error: UNAVAILABLE: ")



def test_global_token_reaches_serve(tmp_path):
    """`loraserve --token X serve`: the global --token given before the command is the server's
    control-plane token (serve's own --token default must not shadow it)."""
    import os
    import subprocess
    import sys
    import time

    import grpc

    from adapter_store.services import free_port
    from clients.client import Client, NotFound, Unauthenticated

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "--token", "s3cret", "serve", "--port", str(port),
                             "--data-dir", str(tmp_path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        target = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with grpc.insecure_channel(target) as ch:
                    grpc.channel_ready_future(ch).result(timeout=1)
                with Client(target) as c:
                    c.stats()
                break
            except Exception:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        with Client(target) as c, pytest.raises(Unauthenticated):
            c.delete_adapter("nope")
        with Client(target, token="s3cret") as c, pytest.raises(NotFound):
            c.delete_adapter("nope")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bench_warm_loads_host_cache_first(server, capsys, tmp_path):
    """--warm: every adapter of the run is in the engine's host cache before the measured window."""
    out_file = tmp_path / "r.json"
    rc, out, err = run(capsys, "--target", server.target, "bench", "--synthetic", "--n", "4", "--ranks", "8",
                       "--targets", "q_proj,v_proj", *SMALL, "--warm", "--out", str(out_file))
    assert rc == 0, err
    (r,) = json.loads(out_file.read_text())["runs"]
    assert r["config"]["warm_s"] > 0 and r["result"]["num_finished"] == 6
    # the adapters the trace draws (the same seeded workload) are warmed, and only those
    cfg = {f.name: r["config"][f.name] for f in dataclasses.fields(WorkloadSpec)}
    spec = WorkloadSpec(**dict(cfg, input_range=tuple(cfg["input_range"]), output_range=tuple(cfg["output_range"])))
    used = {q.adapter_id for q in generate_workload(spec)}
    assert r["config"]["warm_adapters"] == len(used) == r["config"]["workload"]["num_adapters_used"]
    cached = set(server.engine.adapters.cached_ids()) | set(server.engine.adapters.resident)
    assert used <= cached
    # a second --warm run starts with the GPU pool empty of adapters: the first run's residents go
    # back to host memory only (still cached: nothing is fetched again)
    resident = [a for a, x in server.engine.adapters.resident.items() if not x.stale]
    assert resident
    rc, out, err = run(capsys, "--target", server.target, "bench", "--synthetic", "--n", "4", "--ranks", "8",
                       "--targets", "q_proj,v_proj", *SMALL, "--warm", "--out", str(out_file))
    assert rc == 0, err
    (r,) = json.loads(out_file.read_text())["runs"]
    assert r["config"]["pool_unloaded"] >= len(resident) and r["result"]["num_finished"] == 6
    assert r["engine"]["adapter_loads"] >= len(used)     # every drawn adapter copied into the pool again
