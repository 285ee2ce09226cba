"""Load benchmark of the app, as a Space's visitors would arrive: the app is started as the README
says (``python -m app``, the shipped prior, one run at a time) in its own process; N API clients
(``gradio_client``, each its own session and owner token) press Generate at once with a short run
and poll until their own run ends, R rounds in a row.

    python benchmarks/app_load.py [--clients 8] [--rounds 10] [--steps 40] [--poll 0.5] [--threads 1]

Before the first round and after the last, one client alone on the idle server measures Generate
to first preview with an empty queue (the first of the two is the process's first run).

Reports per round and overall: runs completed, client errors, queue positions seen, queue wait
(Generate to the run starting) and time from Generate to the first preview (p50 / p95), it/s of
the running run while the others poll, and the server's resident memory after each round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def start_server(runs_dir: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "app", "--port", str(port), "--no-viewer", "--runs-dir", str(runs_dir), "--threads", str(threads)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    for line in proc.stdout:
        if "DreamFusion app:" in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return proc, line.split()[-1]
        if time.time() > deadline:
            break
    proc.kill()
    raise RuntimeError("the app did not start")


def one_client(url: str, index: int, steps: int, poll: float, out: dict) -> None:
    """Generate, then poll until this client's run ends; record what it saw."""
    from gradio_client import Client

    token = f"load-client-{index:02d}-" + "x" * 12
    rec = {"error": None, "queue_positions": [], "queue_wait": None, "first_preview": None, "its": [], "status": None}
    out[index] = rec
    try:
        client = Client(url, verbose=False)
        t0 = time.perf_counter()
        client.predict(f"a red cube {index}", steps, index, "embedded", "", 10.0, 64, token, api_name="/generate")
        while True:
            info = client.predict(token, api_name="/poll")[1]
            now = time.perf_counter() - t0
            if info.get("queue_position"):
                rec["queue_positions"].append(info["queue_position"])
            if info["status"] in ("running", "paused", "done", "stopped", "failed") and rec["queue_wait"] is None:
                rec["queue_wait"] = now
            if info.get("preview") and rec["first_preview"] is None:
                rec["first_preview"] = now
            if info["status"] == "running" and info.get("its"):
                rec["its"].append(info["its"])
            if info["status"] in ("done", "stopped", "failed"):
                rec["status"] = info["status"]
                if info["status"] != "done":
                    rec["error"] = f"run ended {info['status']}: {info.get('message')}"
                return
            time.sleep(poll)
    except Exception as exc:  # noqa: BLE001 - every client error is a result
        rec["error"] = f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--poll", type=float, default=0.5, help="seconds between a client's polls")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the app's training thread")
    args = ap.parse_args(argv)

    runs_dir = Path(tempfile.mkdtemp(prefix="app-load-"))
    proc, url = start_server(runs_dir, args.threads)
    print(f"app at {url} (pid {proc.pid}); server memory at start: {rss_mb(proc.pid):.0f} MB", flush=True)
    print("\n| round | runs done | client errors | queue positions seen | queue wait p50 / p95 s | Generate to first preview, "
          "empty queue, s | run start to first preview p50 / p95 s | it/s while others poll | server MB after |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    totals = {"done": 0, "errors": 0, "preview": [], "start_preview": [], "wait": [], "its": []}
    memory = []
    solo: list[float] = []

    def alone(label: str) -> None:
        """One client on an idle server: Generate to first preview with an empty queue."""
        out: dict[int, dict] = {}
        one_client(url, 99, args.steps, args.poll, out)
        rec = out[99]
        if rec["error"] or rec["first_preview"] is None:
            totals["errors"] += 1
            print(f"    {label}: error: {rec['error'] or 'no preview'}", flush=True)
        else:
            solo.append(rec["first_preview"])
            print(f"    {label}: Generate to first preview {rec['first_preview']:.2f} s (one client, empty queue)", flush=True)

    try:
        alone("the process's first run")
        for rnd in range(1, args.rounds + 1):
            out: dict[int, dict] = {}
            threads = [threading.Thread(target=one_client, args=(url, i, args.steps, args.poll, out)) for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            recs = list(out.values())
            done = sum(r["status"] == "done" for r in recs)
            errors = [r["error"] for r in recs if r["error"]]
            positions = sorted({p for r in recs for p in r["queue_positions"]})
            waits = [r["queue_wait"] for r in recs if r["queue_wait"] is not None]
            # Generate -> first preview for the runs that started at once (an empty queue), and run
            # start -> first preview for every run
            previews = [r["first_preview"] for r in recs if r["first_preview"] is not None and r["queue_wait"] is not None
                        and not r["queue_positions"]]
            starts = [r["first_preview"] - r["queue_wait"] for r in recs if r["first_preview"] is not None and r["queue_wait"] is not None]
            its = [statistics.median(r["its"]) for r in recs if r["its"]]
            time.sleep(1.0)  # let the last finish settle
            mem = rss_mb(proc.pid)
            memory.append(mem)
            totals["done"] += done
            totals["errors"] += len(errors)
            totals["preview"] += previews
            totals["start_preview"] += starts
            totals["wait"] += waits
            totals["its"] += its

            def pq(v: list[float]):
                return f"{percentile(v, 50):.1f} / {percentile(v, 95):.1f}" if v else "-"

            seen = f"{positions[0]}..{positions[-1]}" if positions else "-"
            rate = f"{statistics.median(its):.1f}" if its else "-"
            print(f"| {rnd} | {done}/{args.clients} | {len(errors)} | {seen} | {pq(waits)} | {pq(previews)} | {pq(starts)} | {rate} | {mem:.0f} |",
                  flush=True)
            for e in errors:
                print(f"    error: {e}", flush=True)
        alone("a run after the rounds")
        print(f"\nruns completed {totals['done']} of {args.clients * args.rounds}, client errors {totals['errors']}")
        if solo:
            print(f"Generate to first preview, one client on an idle server: {', '.join(f'{v:.2f}' for v in solo)} s "
                  f"(target 2 s: {'met' if max(solo) <= 2.0 else 'MISSED'})")
        for key, what in (("preview", "Generate to first preview, runs that did not queue"), ("start_preview", "run start to first preview")):
            if totals[key]:
                print(f"{what}: p50 {percentile(totals[key], 50):.1f} s, p95 {percentile(totals[key], 95):.1f} s, "
                      f"max {max(totals[key]):.1f} s (n = {len(totals[key])})")
        if totals["its"]:
            print(f"training it/s while the others poll: median {statistics.median(totals['its']):.1f}")
        print(f"server memory: after round 1 {memory[0]:.0f} MB, after round {len(memory)} {memory[-1]:.0f} MB "
              f"(growth {memory[-1] - memory[0]:+.0f} MB; budget 150 MB: {'met' if memory[-1] - memory[0] <= 150 else 'MISSED'})")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(runs_dir, ignore_errors=True)
    return 0 if totals["errors"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.exit(main())
