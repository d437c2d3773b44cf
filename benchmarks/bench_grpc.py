"""Tokens/s through real gRPC at several concurrency levels, against a server it starts (or --target).

    python benchmarks/bench_grpc.py --concurrency 1,16,64 --new-tokens 64

Each stream sends a random-token prompt with ignore_eos, so lengths are exact; streams of one
level run in waves for --seconds. Prints a table and, with --out, JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time

import grpc

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from clients.pb import loraserve_pb2 as pb  # noqa: E402
from clients.pb import loraserve_pb2_grpc as pb_grpc  # noqa: E402


async def level(target: str, conc: int, prompt_len: int, new: int, seconds: float, adapters: list[str], vocab: int):
    rng = random.Random(conc)
    toks, reqs, first = 0, 0, []
    t_end = time.perf_counter() + seconds

    async def worker(stub, i):
        nonlocal toks, reqs
        while time.perf_counter() < t_end:
            req = pb.GenerateRequest(adapter_id=adapters[(i + reqs) % len(adapters)],
                                     prompt_token_ids=pb.TokenIds(ids=[rng.randrange(vocab) for _ in range(prompt_len)]),
                                     params=pb.SamplingParams(max_new_tokens=new, ignore_eos=True))
            t0 = time.perf_counter()
            got_first = False
            async for m in stub.Generate(req):
                if not got_first and m.token_ids:
                    first.append(time.perf_counter() - t0)
                    got_first = True
                toks += len(m.token_ids)
            reqs += 1

    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(stub, i) for i in range(conc)])
        dt = time.perf_counter() - t0
    first.sort()
    return {"concurrency": conc, "requests": reqs, "tokens": toks, "seconds": round(dt, 3),
            "tokens_per_s": round(toks / dt, 1), "ttft_p50_ms": round(1000 * first[len(first) // 2], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", help="a running server; default: start the demo model in-process")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--adapters", type=int, default=4, help="local random adapters to spread requests over (0: base)")
    ap.add_argument("--out")
    args = ap.parse_args()
    srv, vocab = None, 99
    names = [""]
    if not args.target:
        import pathlib
        from server.demo import DEMO_CONFIG
        from tests.helpers import ServerThread, make_adapter
        d = pathlib.Path(tempfile.mkdtemp())
        argv = ["--no-store", "--data-dir", str(d)]
        ranks = [8, 16, 32, 64]
        for i in range(args.adapters):
            p = make_adapter(d / f"a{i}", DEMO_CONFIG, ranks[i % 4], 16, ["q_proj", "k_proj", "v_proj", "o_proj"], seed=i)
            argv += ["--adapter", f"a{i}={p}"]
        names = [f"a{i}" for i in range(args.adapters)] or [""]
        srv = ServerThread(argv)
        target, vocab = srv.target, srv.engine.cfg.vocab_size
    else:
        target = args.target
    rows = []
    try:
        for c in [int(x) for x in args.concurrency.split(",")]:
            rows.append(asyncio.run(level(target, c, args.prompt_len, args.new_tokens, args.seconds, names, vocab)))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if srv:
            srv.stop()
    print(f"\n{'streams':>8} {'requests':>9} {'tokens/s':>10} {'TTFT p50 ms':>12}")
    for r in rows:
        print(f"{r['concurrency']:>8} {r['requests']:>9} {r['tokens_per_s']:>10} {r['ttft_p50_ms']:>12}")
    if args.out:
        pathlib_out = __import__("pathlib").Path(args.out)
        pathlib_out.write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
