"""The CPUs the connector's own threads run on, and the one way they are started.

A new thread inherits the CPU mask of the thread that starts it. vLLM's CPU worker binds its OpenMP
team one thread per core (``VLLM_CPU_OMP_THREADS_BIND=auto``, its default), the model runner's own
thread to the team's first core. Left alone, every thread the connector starts in a worker (fetch,
loader, writer, event loop, lookup answers) would share that one core with the forward, and the
team's other cores would sit idle while a load waits for them. The adapter picks the CPUs once
(:func:`set_background_cpus`); each thread started here moves itself onto them before it runs.

Some threads only wait: Mooncake's wheel waits for a transfer in a polling loop that keeps a core
busy for the whole transfer. While nothing else computes (a load before vLLM's forward,
:func:`idle_waits`), such waits run on idle-priority threads (``thread_pool(..., idle=True)``): they
then take only CPU that the transfer and the copies do not want.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .errors import ConfigError

logger = logging.getLogger(__name__)

INHERIT = "inherit"
MAX_CPU = 65535  # above any CPU number Linux hands out (NR_CPUS <= 8192): a typo fails, not a huge set
_background_cpus: frozenset[int] | None = None
_warned = False
_warned_idle = False
_idle_waits: contextvars.ContextVar[bool] = contextvars.ContextVar("vllm_kvcache_idle_waits", default=False)


def parse_cpu_list(text: str) -> frozenset[int]:
    """``"0-3,8 10"`` -> {0, 1, 2, 3, 8, 10}: the list syntax of taskset, GOMP_CPU_AFFINITY and
    Cpus_allowed_list (commas or spaces, ranges ``a-b`` with an optional ``:stride``)."""
    cpus: set[int] = set()
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", item)
        if not match:
            raise ValueError(f"{item!r} is not a CPU number or range (a-b, a-b:stride)")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        stride = int(match.group(3)) if match.group(3) else 1
        if last < first or stride < 1:
            raise ValueError(f"{item!r} is an empty range")
        if last > MAX_CPU:
            raise ValueError(f"{item!r} names CPU {last}, above any CPU number ({MAX_CPU})")
        cpus.update(range(first, last + 1, stride))
    if not cpus:
        raise ValueError("no CPU named")
    return frozenset(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """{0, 1, 2, 5} -> ``"0-2,5"``."""
    spans: list[list[int]] = []
    for cpu in sorted(cpus):
        if spans and cpu == spans[-1][1] + 1:
            spans[-1][1] = cpu
        else:
            spans.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def check_thread_cpus(value: str | None, invalid: Callable[[str, str], ConfigError]) -> None:
    """The start-up check of the ``thread_cpus`` setting: unset, ``inherit`` or CPUs of this host."""
    if value is None or value == INHERIT:
        return
    try:
        cpus = parse_cpu_list(value)
    except ValueError as exc:
        raise invalid("thread_cpus", f"{value!r}: {exc}; give CPUs like 0-3,8, or 'inherit'") from None
    present = os.cpu_count() or 1
    if missing := sorted(c for c in cpus if c >= present):
        raise invalid("thread_cpus", f"CPU {missing[0]} does not exist (this host has CPUs 0-{present - 1})")


# OpenMP's own settings, as vLLM writes them for a worker (vllm/utils/ompmultiprocessing.py):
# GNU OpenMP "0 1 2", LLVM / Intel OpenMP "...,proclist=[0,1,2]", other runtimes OMP_PLACES "{0,1,2}".
def openmp_bound_cpus(env: Mapping[str, str]) -> tuple[frozenset[int], str] | None:
    """The CPUs this process's OpenMP team is bound to, and the variable that says so; None when
    nothing binds it (``VLLM_CPU_OMP_THREADS_BIND=nobind``, or no vLLM CPU worker)."""
    try:
        if gomp := env.get("GOMP_CPU_AFFINITY", "").strip():
            return parse_cpu_list(gomp), "GOMP_CPU_AFFINITY"
        if match := re.search(r"proclist=\[([^\]]*)\]", env.get("KMP_AFFINITY", "")):
            return parse_cpu_list(match.group(1)), "KMP_AFFINITY"
        places = env.get("OMP_PLACES", "").strip()
        if places.startswith("{"):
            return parse_cpu_list(places.replace("{", " ").replace("}", " ")), "OMP_PLACES"
    except ValueError:
        logger.debug("OpenMP binding not understood; the connector's threads keep their inherited CPUs")
    return None


def set_background_cpus(cpus: Iterable[int] | None) -> None:
    """Where threads started from now on run; None: where the thread that starts them runs."""
    global _background_cpus
    _background_cpus = frozenset(cpus) if cpus is not None else None


def background_cpus() -> frozenset[int] | None:
    return _background_cpus


def _name_os_thread(name: str) -> None:
    """Give the kernel the thread's name too (15 bytes), so ``top -H`` and /proc show whose it is."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write(name.encode()[:15].decode(errors="ignore"))
    except OSError:  # not Linux
        pass


def enter_background() -> None:
    """Name the calling thread for the kernel, and move it onto the background CPUs (if set)."""
    global _warned
    _name_os_thread(threading.current_thread().name)
    cpus = _background_cpus
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(0, cpus)  # 0: the calling thread, on Linux
    except Exception as exc:  # e.g. a cpuset narrower than the CPUs named: keep the inherited ones
        if not _warned:
            _warned = True
            logger.warning("cannot move the connector's threads to CPUs %s (%s); they keep the CPUs they "
                           "inherited", format_cpu_list(cpus), exc)


def start_thread(target: Callable[..., Any], name: str, args: tuple = (), daemon: bool = True) -> threading.Thread:
    """A started daemon thread that runs ``target(*args)`` on the background CPUs."""
    def run() -> None:
        enter_background()
        target(*args)

    thread = threading.Thread(target=run, name=name, daemon=daemon)
    thread.start()
    return thread


def _enter_idle_priority() -> None:
    """Move the calling thread to SCHED_IDLE: it runs only when no other thread wants the CPU.
    Any thread may lower its own priority; none may raise it again without CAP_SYS_NICE, which is
    why an idle pool's threads stay idle for good and only waits go to them."""
    global _warned_idle
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread, on Linux
    except (AttributeError, OSError) as exc:  # not Linux, or refused by a seccomp profile
        if not _warned_idle:
            _warned_idle = True
            logger.warning("cannot give waiting threads idle priority (%s); their waits take CPU from the "
                           "transfers they wait for", exc)


def thread_pool(max_workers: int, name_prefix: str, idle: bool = False) -> ThreadPoolExecutor:
    """A thread pool whose threads run on the background CPUs; ``idle``: at idle priority, for
    calls that only wait (see :func:`idle_waits`)."""
    def initializer() -> None:
        enter_background()
        if idle:
            _enter_idle_priority()

    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name_prefix, initializer=initializer)


@contextlib.contextmanager
def idle_waits(allowed: bool = True) -> Iterator[None]:
    """Within: nothing else computes while this work runs (a load before vLLM's forward), so a
    call that only waits for it may wait at idle priority. Outside (a load beside the forward),
    an idle waiter could be starved for as long as the forward keeps the cores, so it may not.
    A context variable: it follows the work into the storage layer's loop, whose
    ``run_coroutine_threadsafe`` runs each coroutine in a copy of its caller's context."""
    token = _idle_waits.set(allowed)
    try:
        yield
    finally:
        _idle_waits.reset(token)


def idle_waits_allowed() -> bool:
    return _idle_waits.get()

