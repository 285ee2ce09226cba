"""Load benchmark of the app, as a Space's visitors would arrive: the app is started as the README
says (``python -m app``, the shipped prior, its default worker processes) in its own process; N API
clients (Gradio's HTTP API through its queue, as a page calls it; each its own session and owner
token) press Generate in the same instant with a short run and poll until their own run ends, R
rounds in a row.

    python benchmarks/app_load.py [--clients 8] [--rounds 10] [--steps 40] [--poll 0.5] [--threads 1] [--solo 3]

Before the first round and after the last, one client alone on the idle server runs the same
short run, ``--solo`` times each: the median of their it/s is the reference for the it/s of the
runs under load (the first of them also loads the worker's prior).

Reports per round and overall: runs completed, client errors, queue positions seen, the first of
the N simultaneous Generates to its first preview, it/s of the running runs while the others poll
(and its ratio to the run alone), the p95 latency of the polls of clients whose own run is not
the one being written while another run is being written (its mesh and turntable), and the
memory of all the server's processes (the page's and its workers': the sum of their resident
and of their proportional set sizes) after each round.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.headless import free_port  # noqa: E402


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def memory_mb(pid: int) -> tuple[float, float]:
    """(sum of resident set sizes, sum of proportional set sizes) of a process and its descendants, MB."""
    rss = pss = 0.0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) / 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) / 1024
        except OSError:
            pass
    return rss, pss


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (its threads included), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def start_server(runs_dir: Path, threads: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "app", "--port", str(port), "--no-viewer", "--runs-dir", str(runs_dir), "--threads", str(threads), *extra]
    proc = subprocess.Popen(cmd, cwd=runs_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 300
    for line in proc.stdout:
        if "DreamFusion app:" in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return proc, line.split()[2]
        if time.time() > deadline:
            break
    proc.kill()
    raise RuntimeError("the app did not start")


class LoadClient:
    """One visitor: connects first, then (at ``go``) presses Generate and polls until its run ends.

    It speaks Gradio's HTTP API through the server's queue (``POST gradio_api/call/NAME`` with its
    own session, then the event's result stream), as a browser's page does, and fetches each new
    preview image as a browser would. Not ``gradio_client``: that library waits in 50 ms sleep loops
    for every message (an idle server's poll took 89 ms through it against 14 ms over HTTP) and its
    threads took a quarter of this machine's CPU under load, from the runs it was measuring."""

    def __init__(self, url: str, index: int, steps: int, poll: float):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=120)
        self.session = f"load-session-{index:02d}-{os.getpid()}-{time.monotonic_ns()}"
        self.token = f"load-client-{index:02d}-" + "x" * 12
        self.index, self.steps, self.poll = index, steps, poll
        self.rec = {"error": None, "queue_positions": [], "first_preview": None, "its": [], "status": None, "polls": [], "saving": []}

    def call(self, api: str, *args: object) -> list:
        """One event through the queue: its outputs, or ``RuntimeError`` with the server's message."""
        r = self.http.post(f"gradio_api/call/{api}", json={"data": list(args), "session_hash": self.session})
        r.raise_for_status()
        event, data = None, None
        with self.http.stream("GET", f"gradio_api/call/{api}/{r.json()['event_id']}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    data = json.loads(line.split(":", 1)[1])
                    break
        if event != "complete":
            raise RuntimeError(f"{api}: {event}: {data}")
        return data

    def run(self, go: threading.Event, t0: list[float]) -> None:
        rec = self.rec
        try:
            go.wait()
            self.call("generate", f"a red cube {self.index}", self.steps, self.index, "embedded", "", 3.0, 64, self.token)
            while True:
                s = time.perf_counter()
                out = self.call("poll", self.token)
                info, image = out[1], out[3]
                image = image.get("value", image) if isinstance(image, dict) else None  # an update, or the file itself
                if isinstance(image, dict) and image.get("url"):  # a new render: the page fetches it
                    self.http.get(image["url"]).raise_for_status()
                e = time.perf_counter()
                rec["polls"].append((s - t0[0], e - s, bool(info.get("saving"))))
                if info.get("queue_position"):
                    rec["queue_positions"].append(info["queue_position"])
                if info.get("preview") and rec["first_preview"] is None:
                    rec["first_preview"] = e - t0[0]
                if info.get("saving"):
                    rec["saving"].append(e - t0[0])
                if info["status"] == "running" and info.get("its") and not info.get("saving"):
                    rec["its"].append(info["its"])
                if info["status"] in ("done", "stopped", "failed"):
                    rec["status"] = info["status"]
                    if info["status"] != "done":
                        rec["error"] = f"run ended {info['status']}: {info.get('message')}"
                    return
                time.sleep(self.poll)
        except Exception as exc:  # noqa: BLE001 - every client error is a result
            rec["error"] = f"{type(exc).__name__}: {exc}"


def play(url: str, n: int, steps: int, poll: float, first_index: int = 0) -> list[dict]:
    clients = [LoadClient(url, first_index + i, steps, poll) for i in range(n)]
    go, t0 = threading.Event(), [0.0]
    threads = [threading.Thread(target=c.run, args=(go, t0)) for c in clients]
    for t in threads:
        t.start()
    t0[0] = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    return [c.rec for c in clients]


def polls_during_others_saving(recs: list[dict]) -> list[float]:
    """Latencies of the polls a client made while another client's run was being written."""
    out = []
    for i, rec in enumerate(recs):
        others = [t for j, r in enumerate(recs) if j != i for t in r["saving"]]
        for start, latency, mine_saving in rec["polls"]:
            if not mine_saving and any(abs(start - t) < 0.5 for t in others):
                out.append(latency)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--poll", type=float, default=0.5, help="seconds between a client's polls")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each worker process")
    ap.add_argument("--solo", type=int, default=3,
                    help="runs of one client alone before and after the rounds: the reference it/s is their median (this machine's speed drifts)")
    ap.add_argument("--server-args", default="", help="more arguments for python -m app (e.g. '--max-concurrent 1')")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="app-load-"))
    runs_dir = work / "runs"
    proc, url = start_server(runs_dir, args.threads, args.server_args.split())
    print(f"app at {url} (pid {proc.pid}, {len(process_tree(proc.pid)) - 1} worker processes); server memory at start: "
          "{:.0f} MB resident, {:.0f} MB proportional".format(*memory_mb(proc.pid)), flush=True)
    solo: list[dict] = []

    def alone(label: str) -> None:
        rec = play(url, 1, args.steps, args.poll, first_index=90 + len(solo))[0]
        if rec["error"] or rec["first_preview"] is None:
            print(f"    {label}: error: {rec['error'] or 'no preview'}", flush=True)
        else:
            solo.append(rec)
            its = statistics.median(rec["its"]) if rec["its"] else float("nan")
            print(f"    {label}: Generate to first preview {rec['first_preview']:.2f} s, {its:.2f} it/s (one client, idle server)", flush=True)

    totals = {"done": 0, "errors": 0, "first": [], "its": [], "latency": [], "seconds": 0.0}
    memory = []
    try:
        for k in range(args.solo):
            alone(f"alone, before the rounds ({k + 1})")
        print(f"\n| round | runs done | client errors | queue positions seen | first of the {args.clients}: Generate to first preview s | "
              "it/s under load, median (min) | polls while another run is written: p50 / p95 ms | server MB after (resident / proportional) "
              "| round s |")
        print("|---|---|---|---|---|---|---|---|---|", flush=True)
        for rnd in range(1, args.rounds + 1):
            started = time.perf_counter()
            recs = play(url, args.clients, args.steps, args.poll)
            seconds = time.perf_counter() - started
            totals["seconds"] += seconds
            done = sum(r["status"] == "done" for r in recs)
            errors = [r["error"] for r in recs if r["error"]]
            positions = sorted({p for r in recs for p in r["queue_positions"]})
            firsts = [r["first_preview"] for r in recs if r["first_preview"] is not None]
            its = [statistics.median(r["its"]) for r in recs if r["its"]]
            latency = polls_during_others_saving(recs)
            time.sleep(1.0)  # let the last finish settle
            mem = memory_mb(proc.pid)
            memory.append(mem)
            totals["done"] += done
            totals["errors"] += len(errors)
            totals["first"] += [min(firsts)] if firsts else []
            totals["its"] += its
            totals["latency"] += latency
            seen = f"{positions[0]}..{positions[-1]}" if positions else "-"
            rate = f"{statistics.median(its):.2f} ({min(its):.2f})" if its else "-"
            lat = f"{1000 * percentile(latency, 50):.0f} / {1000 * percentile(latency, 95):.0f}" if latency else "-"
            first = f"{min(firsts):.2f}" if firsts else "-"
            print(f"| {rnd} | {done}/{args.clients} | {len(errors)} | {seen} | {first} | {rate} | {lat} | {mem[0]:.0f} / {mem[1]:.0f} "
                  f"| {seconds:.0f} |", flush=True)
            for e in errors:
                print(f"    error: {e}", flush=True)
        tree = process_tree(proc.pid)
        page, workers = cpu_seconds(proc.pid), sum(cpu_seconds(p) for p in tree[1:])
        own = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        print(f"\nCPU seconds over the rounds: the page's process {page:.0f}, its workers {workers:.0f}, this benchmark's "
              f"{args.clients} clients {own:.0f} (on a Space the clients' share is on their own machines)")
        for k in range(args.solo):
            alone(f"alone, after the rounds ({k + 1})")
        n = args.clients * args.rounds
        print(f"\nruns completed {totals['done']} of {n}, client errors {totals['errors']}; "
              f"{60 * totals['done'] / totals['seconds']:.1f} runs a minute over the rounds")
        ok = totals["errors"] == 0 and totals["done"] == n
        if solo and totals["its"]:
            alone_its = [statistics.median(r["its"]) for r in solo if r["its"]]
            ref = statistics.median(alone_its)
            under = statistics.median(totals["its"])
            met = under >= 0.9 * ref
            print(f"training it/s: alone {ref:.2f} (median of {len(alone_its)}: {min(alone_its):.2f} to {max(alone_its):.2f}),"
                  f" while the other {args.clients - 1} clients poll {under:.2f} (median of the runs' medians), "
                  f"{100 * under / ref:.0f}% (target 90%: {'met' if met else 'MISSED'})")
        if totals["first"]:
            worst = max(totals["first"])
            print(f"first of {args.clients} simultaneous Generates to its first preview: worst round {worst:.2f} s, "
                  f"median {statistics.median(totals['first']):.2f} s (target 2 s: {'met' if worst <= 2.0 else 'MISSED'})")
        if totals["latency"]:
            p95 = percentile(totals["latency"], 95)
            print(f"poll latency while another run is being written: p50 {1000 * percentile(totals['latency'], 50):.0f} ms, "
                  f"p95 {1000 * p95:.0f} ms (n = {len(totals['latency'])}; target p95 300 ms: {'met' if p95 <= 0.3 else 'MISSED'})")
        growth = memory[-1][0] - memory[0][0]
        print(f"server memory (all processes): after round 1 {memory[0][0]:.0f} MB resident ({memory[0][1]:.0f} proportional), after round "
              f"{len(memory)} {memory[-1][0]:.0f} MB ({memory[-1][1]:.0f}): {growth:+.0f} MB (target within 100 MB: "
              f"{'met' if abs(growth) <= 100 else 'MISSED'})")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.exit(main())
