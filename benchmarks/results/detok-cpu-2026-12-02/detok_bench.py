"""TextStream old (decode everything each push) vs new (a window), per token, one token a push.
    git show 6540eed:server/tokenizer.py > /tmp/old_tokenizer.py && python benchmarks/results/detok-cpu-2026-12-02/detok_bench.py"""
import importlib.util, pathlib, random, sys, tempfile, time
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))
spec = importlib.util.spec_from_file_location("old_tok", "/tmp/old_tokenizer.py"); old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
from server import tokenizer as new
from server.demo import build_tokenizer
d = pathlib.Path(tempfile.mkdtemp()); build_tokenizer().save(str(d / "tokenizer.json"))
tok = new.Tokenizer(d / "tokenizer.json")
for n in (256, 512, 2048):
    ids = [random.Random(n).randrange(3, 95) for _ in range(n)]
    res = {}
    for name, mod in (("old", old), ("new", new)):
        best = 1e9
        for _ in range(3):
            ts = mod.TextStream(tok, ["zzz"])
            t0 = time.perf_counter()
            out = [ts.push([t], final=False)[0] for t in ids]
            best = min(best, time.perf_counter() - t0)
        res[name] = best / n * 1e6
    print(f"{n} tokens, demo tokenizer, one per push: old {res['old']:.1f} us/token, new {res['new']:.1f} us/token")
