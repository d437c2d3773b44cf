"""A call's pick: the fastest variant of the alone run (by median step), alternated with the
committed kernels in an engine variants file (argv[4] rounds each, default 3)."""
import json
import sys

res = json.load(open(sys.argv[1]))["results"]
ok = {k: v["step_ms"] for k, v in res.items() if v.get("ok") and not k.startswith("committed")}
best = min(ok, key=ok.get)
ref = res["committed"]["step_ms"]
print(f"best alone: {best} {ok[best]:.3f} ms vs committed {ref:.3f} ({ok[best] / ref:.3f}x)")
spec = json.load(open(sys.argv[2]))[best]
out = {}
for i in range(1, 1 + int(sys.argv[4] if len(sys.argv) > 4 else 3)):
    out[f"committed-{i}"] = {}
    out[f"{best}-{i}"] = spec
json.dump(out, open(sys.argv[3], "w"), indent=1)
