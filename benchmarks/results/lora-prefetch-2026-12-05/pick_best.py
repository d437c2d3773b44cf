"""The fastest correct variant of a bench_lora_decode.py run, against its first one, as an
engine_tune_sweep.py variants file (first the defaults, then the winner); exit 1 if none wins by 1%."""
import json
import sys

src, dst = sys.argv[1], sys.argv[2]
results = json.load(open(src))["results"]
first = next(iter(results))
ok = {k: r for k, r in results.items() if r.get("ok")}
best = min(ok, key=lambda k: ok[k]["step_ms"])
ratio = ok[best]["step_ms"] / results[first]["step_ms"]
print(f"best {best}: {ok[best]['step_ms']:.3f} ms, {ratio:.3f}x {first}")
if best == first or ratio > 0.99:
    sys.exit(1)
json.dump({first: results[first]["spec"], best: ok[best]["spec"]}, open(dst, "w"))
