"""Ray: joining or starting a cluster, what it can run, and running tasks on it. Any function over
a list of arguments (:func:`run_tasks`): a batch's prompts, the quality benchmark's jobs. A task
that fails or whose worker dies is one failed outcome; Ctrl-C cancels the rest."""

from __future__ import annotations

import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import BatchError

INSTALL_HINT = 'pip install -e ".[cluster]"'


@dataclass(frozen=True)
class ClusterOptions:
    """Where the runs go and what each asks for."""

    address: str | None = None
    """None: start Ray on this machine; 'auto' or 'host:port': join the cluster there; 'ray://host:port': through Ray Client"""
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    max_parallel: int = 0
    """runs at once (0: as many as the cluster's nodes fit)"""


def validate_cluster(opts: ClusterOptions) -> None:
    if not opts.cpus_per_run > 0:
        raise BatchError(f"--cpus-per-run must be positive, got {opts.cpus_per_run}")
    if opts.gpus_per_run < 0:
        raise BatchError(f"--gpus-per-run must not be negative, got {opts.gpus_per_run}")
    if opts.max_parallel < 0:
        raise BatchError(f"--max-parallel must not be negative (0: as many as fit), got {opts.max_parallel}")
    if opts.address is not None and opts.address != "auto":
        parse_address(opts.address)


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of 'host:port' or 'ray://host:port' (a :class:`BatchError` otherwise)."""
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BatchError(f"cannot read the Ray address {address!r}: use auto, host:port (e.g. 10.0.0.5:6379) or ray://host:port")
    return host.strip("[]"), int(port)


def probe_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when nothing listens at a cluster address (Ray itself would retry
    for minutes, logging as it goes)."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise BatchError(f"cannot reach a Ray cluster at {address} ({reason}); start one with `ray start --head` "
                         "or check the address (docs/batch.md)") from None


def import_ray(purpose: str = "this") -> Any:
    """The ray module, or a one-line :class:`BatchError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise BatchError(f"{purpose} needs Ray, an optional extra: {INSTALL_HINT}") from None
    return ray


def resource_text(cpus: float, gpus: float) -> str:
    n = lambda v: f"{v:g}"
    return f"{n(cpus)} CPU{'s' if cpus != 1 else ''} and " + (f"{n(gpus)} GPU{'s' if gpus != 1 else ''}" if gpus else "no GPU")


def node_resources(nodes: Sequence[dict]) -> list[tuple[float, float]]:
    """(CPUs, GPUs) of each live node, from ``ray.nodes()``."""
    return [(float(n.get("Resources", {}).get("CPU", 0.0)), float(n.get("Resources", {}).get("GPU", 0.0)))
            for n in nodes if n.get("Alive", n.get("alive", False))]


def check_resources(nodes: Sequence[tuple[float, float]], cpus: float, gpus: float) -> None:
    """Refuse what the cluster can never run (Ray would wait for it forever): ``nodes`` are the
    (CPUs, GPUs) of each live node; one run needs ``cpus`` and ``gpus`` on one node."""
    ask = f"--cpus-per-run {cpus:g}" + (f" --gpus-per-run {gpus:g}" if gpus else "")
    if not nodes:
        raise BatchError("the Ray cluster has no live node")
    if any(c >= cpus and g >= gpus for c, g in nodes):
        return
    if gpus and not any(g > 0 for _, g in nodes):
        raise BatchError(f"the cluster has no GPU but each run asks for {gpus:g} ({ask}); drop --gpus-per-run or join a cluster with GPUs")
    best = max(nodes, key=lambda cg: (cg[1] >= gpus, cg[0], cg[1]))
    raise BatchError(f"no node of the cluster can give one run {resource_text(cpus, gpus)} ({ask}): the largest has "
                     f"{resource_text(*best)}; ask for less per run")


def capacity(nodes: Sequence[tuple[float, float]], cpus: float, gpus: float) -> int:
    """How many runs of ``cpus`` and ``gpus`` the nodes hold at once (at least 1)."""
    total = 0
    for c, g in nodes:
        fit = math.floor(c / cpus + 1e-9)
        if gpus:
            fit = min(fit, math.floor(g / gpus + 1e-9))
        total += max(fit, 0)
    return max(total, 1)


def local_cpus(opts: ClusterOptions, cores: int | None = None) -> int:
    """CPUs a local Ray is started with: the machine's cores, or more when --max-parallel asks for
    more runs at once than fit (they then share the cores, as asked). A run that asks for more
    CPUs than the machine has is not made to fit: :func:`check_resources` refuses it."""
    cores = cores or os.cpu_count() or 1
    if opts.cpus_per_run > cores or not opts.max_parallel:
        return cores
    return max(cores, math.ceil(opts.cpus_per_run * opts.max_parallel))


@contextmanager
def _stderr_captured() -> Iterator[None]:
    """Hold back what is written to file descriptor 2 (Ray's C++ client logs each retry of a
    failing connection there) while connecting; the failure is then told in one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _client_token_auth() -> None:
    """Ray Client (ray://) in Ray 2.60 sends the cluster's auth token only when RAY_AUTH_MODE says
    so, though ``ray start`` enables token authentication by default: when a token is at hand
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and no mode is set, use it."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if os.environ.get("RAY_AUTH_TOKEN") or (path and Path(path).is_file()) or (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        try:  # Ray reads its config once, at import: refresh it, as ray.init does when it enables tokens
            from ray._raylet import Config

            Config.initialize("")
        except (ImportError, AttributeError):
            pass


@contextmanager
def ray_session(opts: ClusterOptions) -> Iterator[Any]:
    """Ray, connected: an existing session of this process is used as it is (and left running);
    otherwise Ray starts on this machine (no address) or joins the cluster at the address, and is
    shut down at the end. Errors are one-line :class:`BatchError`\\ s."""
    import logging

    ray = import_ray()
    if opts.address not in (None, "auto"):
        probe_address(opts.address)
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if opts.address is None:
        kwargs.update(address="local", num_cpus=local_cpus(opts))
    else:
        kwargs["address"] = opts.address
        if opts.address.startswith("ray://"):
            kwargs.pop("include_dashboard")  # not an option of Ray Client
            _client_token_auth()
    try:
        if opts.address is None:
            ray.init(**kwargs)  # starts Ray's processes, which must keep this process's stderr
        else:
            with _stderr_captured():
                ray.init(**kwargs)
    except Exception as exc:  # Ray's connection errors come in many types; the user needs one line
        message = " ".join(str(exc).split())[:300]
        where = "start Ray on this machine" if opts.address is None else f"connect to the Ray cluster at {opts.address}"
        raise BatchError(f"cannot {where}: {message}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass
class TaskOutcome:
    """What became of one task: status ok (``value`` is the function's result), failed (``error``
    says why: an exception, a killed worker) or cancelled (interrupted before it finished)."""

    index: int
    status: str
    value: Any = None
    error: str = ""
    seconds: float = 0.0


def describe_error(exc: BaseException) -> str:
    """One line for a task's failure: the exception raised in the task, or what Ray says of the worker."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and not isinstance(cause, type(exc)):
        exc = cause
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}"[:400]


class Progress:
    """The batch's progress bar: done / failed / running with ETA (tqdm), or nothing when quiet."""

    def __init__(self, total: int, quiet: bool = False, desc: str = "batch") -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True, disable=quiet or total == 0, file=sys.stderr)
        self.done = self.failed = self.running = 0
        self.quiet = quiet

    def update(self, running: int, finished: TaskOutcome | None = None) -> None:
        self.running = running
        if finished is not None:
            self.done += finished.status == "ok"
            self.failed += finished.status != "ok"
        self.bar.set_postfix_str(f"done {self.done}, failed {self.failed}, running {self.running}", refresh=finished is None)
        if finished is not None:
            self.bar.update(1)

    def write(self, text: str) -> None:
        if not self.quiet:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _cancel(ray: Any, in_flight: dict, grace: float = 10.0) -> dict:
    """Cancel running tasks: first as Ctrl-C inside each (its staging folder is removed as it
    unwinds), then by killing the worker of any that has not stopped after ``grace`` seconds.
    Returns {ref: outcome-or-exception} for each."""
    refs = list(in_flight)
    for ref in refs:
        ray.cancel(ref, force=False)
    done, rest = ray.wait(refs, num_returns=len(refs), timeout=grace)
    for ref in rest:
        ray.cancel(ref, force=True)
    if rest:
        ray.wait(rest, num_returns=len(rest), timeout=grace)
    results = {}
    for ref in refs:
        try:
            results[ref] = ("ok", ray.get(ref, timeout=1.0))
        except BaseException as exc:  # cancelled, killed, or still unkillable: not a result
            results[ref] = ("cancelled", exc)
    return results


def run_tasks(fn: Callable[..., Any], arguments: Sequence[tuple], opts: ClusterOptions, *,
              on_done: Callable[[TaskOutcome], None] | None = None, progress: Progress | None = None,
              runtime_env: dict | None = None, label: Callable[[int], str] | None = None) -> list[TaskOutcome]:
    """Run ``fn(*args)`` for each tuple of ``arguments`` as one Ray task asking for
    ``opts.cpus_per_run`` CPUs and ``opts.gpus_per_run`` GPUs, at most ``opts.max_parallel`` at once
    (default: as many as the cluster's nodes fit). Ray must be connected (:func:`ray_session`).

    Fault isolation: a task that raises, or whose worker dies, is an outcome with status 'failed'
    (tasks are not retried: a batch's rerun is the retry); the others go on. ``on_done`` is called
    in the driver as each finishes (in completion order). Ctrl-C (KeyboardInterrupt) cancels the
    running tasks and leaves the rest undone: their outcomes say 'cancelled'. Returns the outcomes
    in the order of ``arguments``."""
    import ray
    from ray.exceptions import TaskCancelledError

    nodes = node_resources(ray.nodes())
    check_resources(nodes, opts.cpus_per_run, opts.gpus_per_run)
    room = capacity(nodes, opts.cpus_per_run, opts.gpus_per_run)
    window = opts.max_parallel or room
    options: dict[str, Any] = {"num_cpus": opts.cpus_per_run, "num_gpus": opts.gpus_per_run, "max_retries": 0}
    if runtime_env:
        options["runtime_env"] = runtime_env
    remote = ray.remote(fn).options(**options)
    label = label or (lambda i: f"task {i}")

    outcomes: list[TaskOutcome | None] = [None] * len(arguments)
    queue = list(range(len(arguments)))[::-1]
    in_flight: dict[Any, tuple[int, float]] = {}

    def finish(outcome: TaskOutcome) -> None:
        outcomes[outcome.index] = outcome
        if progress is not None:
            progress.update(min(len(in_flight), room), outcome)
            if outcome.status == "failed":
                progress.write(f"failed: {label(outcome.index)}: {outcome.error}")
        if on_done is not None:
            on_done(outcome)

    try:
        while queue or in_flight:
            while queue and len(in_flight) < window:
                i = queue.pop()
                in_flight[remote.remote(*arguments[i])] = (i, time.perf_counter())
            if progress is not None:
                progress.update(min(len(in_flight), room))
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in done:
                i, start = in_flight.pop(ref)
                try:
                    outcome = TaskOutcome(i, "ok", ray.get(ref), seconds=time.perf_counter() - start)
                except TaskCancelledError as exc:
                    outcome = TaskOutcome(i, "cancelled", error=describe_error(exc), seconds=time.perf_counter() - start)
                except Exception as exc:  # the task raised, or its worker died: that prompt failed, the batch goes on
                    outcome = TaskOutcome(i, "failed", error=describe_error(exc), seconds=time.perf_counter() - start)
                finish(outcome)
    except KeyboardInterrupt:
        if progress is not None:
            progress.write(f"interrupted: cancelling {len(in_flight)} running task(s)...")
        for ref, (status, value) in _cancel(ray, in_flight).items():
            i, start = in_flight.pop(ref)
            if status == "ok":
                try:
                    finish(TaskOutcome(i, "ok", value, seconds=time.perf_counter() - start))
                except KeyboardInterrupt:  # Ctrl-C again while winding down: the result is kept (finish records it first)
                    pass
            else:
                outcomes[i] = TaskOutcome(i, "cancelled", error="interrupted", seconds=time.perf_counter() - start)
    return [o if o is not None else TaskOutcome(i, "cancelled", error="interrupted") for i, o in enumerate(outcomes)]
