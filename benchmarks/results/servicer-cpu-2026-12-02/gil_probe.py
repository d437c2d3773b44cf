"""An engine-like thread (N small torch calls, then a 'device wait' sleep) beside a thread that
keeps the GIL busy in ~80 us chunks at a given duty cycle (the servicers' event loop streaming)."""
import sys, threading, time, torch
torch.set_num_threads(1)
def run(switch, duty, ops=600, steps=100):
    sys.setswitchinterval(switch)
    stop = threading.Event()
    def loop_thread():      # pure-Python work in 80 us chunks, sleeping between to make `duty`
        while not stop.is_set():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 80e-6 * 10:   # 10 "messages"
                pass
            if duty < 1:
                time.sleep(80e-6 * 10 * (1 - duty) / duty)
    th = threading.Thread(target=loop_thread, daemon=True)
    if duty > 0:
        th.start()
    a = torch.zeros(64); host = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(ops):
            a = a + 1          # a small torch call: releases and retakes the GIL
        host += time.perf_counter() - t0
        time.sleep(0.02)       # the device step
    stop.set()
    return host / steps * 1e3
for duty in (0, 0.5, 0.8):
    for sw in (0.005, 0.001, 0.0002):
        print(f"busy thread duty {duty:.0%}, switch interval {sw*1e3:.1f} ms: {run(sw, duty):.3f} ms of host work per step (600 torch calls)")
