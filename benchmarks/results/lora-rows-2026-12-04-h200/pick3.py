"""Call 3's engine variants: the committed kernels and the column tiles (ROWS False), and the fastest
one-module tile variant of the alone run where it beat the committed kernels by 1% or more; rounds
alternated (argv[4], default 3)."""
import json
import sys

res = json.load(open(sys.argv[1]))["results"]
spec = json.load(open(sys.argv[2]))
ok = {k: v["step_ms"] for k, v in res.items() if v.get("ok") and k.startswith("one-")}
ref = res["committed"]["step_ms"]
pick = {"committed": {}, "columns": spec["columns"]}
if ok:
    best = min(ok, key=ok.get)
    print(f"best one-module tiles alone: {best} {ok[best]:.3f} ms vs committed {ref:.3f} ({ok[best] / ref:.3f}x)")
    if ok[best] <= 0.99 * ref:
        pick[best] = spec[best]
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
json.dump({f"{k}-{i}": v for i in range(1, rounds + 1) for k, v in pick.items()}, open(sys.argv[3], "w"), indent=1)
