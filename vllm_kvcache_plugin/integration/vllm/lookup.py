"""The lookup channel: the scheduler asks the worker's tiers how much of a prompt is stored.

vLLM runs the scheduler (engine core) and each worker in different processes, but the hot cache
and the disk index live in the worker. So each worker serves lookups on a Linux abstract unix
socket (no file to clean up, not reachable from the network), and the scheduler asks every
worker (each tensor- and pipeline-parallel rank) at once and takes the smallest answer. A worker
that does not answer within the time-out counts as a miss. :class:`AsyncLookups` asks from a
background thread, so the scheduler's step never waits on a store for more than a millisecond.

Frame (little-endian): request ``u32 magic, u32 n, n * 32 bytes`` (raw SHA-256 chunk hashes);
reply ``u32 hit_chunks, u32 hot, u32 disk, u32 remote``. Nothing is unpickled.
"""

from __future__ import annotations

import collections
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ...engine import TierName
from ...threads import start_thread

logger = logging.getLogger(__name__)

MAGIC = 0x4B564C4B  # "KVLK"
_REQ = struct.Struct("<II")
_REPLY = struct.Struct("<IIII")
HASH_BYTES = 32
MAX_CHUNKS = 1 << 20


@dataclass(frozen=True)
class LookupReply:
    hit_chunks: int
    hot: int = 0
    disk: int = 0
    remote: int = 0

    def by_tier(self) -> dict[str, int]:
        counts = (self.hot, self.disk, self.remote)  # in TierName's order, as the reply frame carries them
        return {tier.value: n for tier, n in zip(TierName, counts, strict=True) if n}


def lookup_address(engine_id: str, dp_rank: int, tp_rank: int) -> str:
    return f"\0vllm-kvcache-plugin/{engine_id}/{dp_rank}/{tp_rank}"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("peer closed")
        got += k
    return bytes(buf)


class LookupServer:
    """Answers lookups on a background thread with ``handler(hashes) -> LookupReply``."""

    def __init__(self, address: str, handler: Callable[[list[str]], LookupReply]) -> None:
        self.address = address
        self.handler = handler
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(address)
        self._sock.listen(16)
        self._closed = False
        self._thread = start_thread(self._accept_loop, "kvcache-lookup")

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            start_thread(self._serve, "kvcache-lookup-conn", args=(conn,))

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while not self._closed:
                try:
                    magic, n = _REQ.unpack(_recv_exact(conn, _REQ.size))
                    if magic != MAGIC or n > MAX_CHUNKS:
                        logger.warning("Lookup channel: bad frame, closing the connection")
                        return
                    raw = _recv_exact(conn, n * HASH_BYTES)
                except (OSError, ConnectionError):
                    return
                hashes = [raw[i * HASH_BYTES:(i + 1) * HASH_BYTES].hex() for i in range(n)]
                try:
                    reply = self.handler(hashes)
                except Exception:
                    logger.exception("Lookup failed; answering a miss")
                    reply = LookupReply(0)
                try:
                    conn.sendall(_REPLY.pack(reply.hit_chunks, reply.hot, reply.disk, reply.remote))
                except OSError:
                    return

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


class LookupClient:
    """One persistent connection per worker; any failure or time-out is a miss (and a reconnect)."""

    def __init__(self, addresses: Sequence[str], timeout: float) -> None:
        self.addresses = list(addresses)
        self.timeout = timeout
        self._socks: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def _send(self, address: str, frame: bytes) -> socket.socket:
        sock = self._socks.get(address)
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(address)
            self._socks[address] = sock
        sock.sendall(frame)
        return sock

    def _failed(self, address: str, exc: BaseException) -> None:
        sock = self._socks.pop(address, None)
        if sock is not None:
            sock.close()
        if address not in self._warned:
            self._warned.add(address)
            logger.warning("Worker lookup channel %r not answering (%s); treating as a miss",
                           address.lstrip("\0"), exc)

    def lookup(self, hashes: Sequence[str]) -> LookupReply:
        """Ask every worker at once (all frames go out before any reply is read); a chunk counts
        only if every rank has it, so the answer is the smallest."""
        if not hashes:
            return LookupReply(0)
        frame = _REQ.pack(MAGIC, len(hashes)) + b"".join(bytes.fromhex(h) for h in hashes)
        replies = []
        with self._lock:
            sent = []
            for address in self.addresses:
                try:
                    sent.append((address, self._send(address, frame)))
                except (OSError, ConnectionError) as exc:
                    self._failed(address, exc)
                    sent.append((address, None))
            for address, sock in sent:
                if sock is None:
                    replies.append(LookupReply(0))
                    continue
                try:
                    replies.append(LookupReply(*_REPLY.unpack(_recv_exact(sock, _REPLY.size))))
                    self._warned.discard(address)
                except (OSError, ConnectionError, struct.error) as exc:
                    self._failed(address, exc)
                    replies.append(LookupReply(0))
        return min(replies, key=lambda r: r.hit_chunks)

    def close(self) -> None:
        with self._lock:
            for sock in self._socks.values():
                sock.close()
            self._socks.clear()


class AsyncLookups:
    """Lookups off the scheduler's thread.

    ``reply(req_id, hashes)`` hands a request's hashes to one background thread the first time and
    returns the answer once it has come, else None ("ask again next step", which vLLM does). How long
    it may wait for answers depends on the step (``new_step(busy)`` starts one):

    * after a step that computed something (others are running), not at all: the answer is taken
      next step if it has come by then. A 1 ms budget measured 2.4-3.7 ms at p99 beside running
      requests, most likely because a waiting thread resumes only once it has the GIL back, up to
      Python's 5 ms switch interval later while the lookup or loader threads run Python code.
    * in an idle step, at most ``step_budget`` seconds in all: that wait costs no one, and a quick
      store answers within the step, which saves the newcomer the extra step.

    So a slow or frozen store (a worker waiting on a store that accepts connections and answers
    nothing) holds no step: running requests keep their pace while the new ones wait or time out
    into misses.
    """

    def __init__(self, client: LookupClient, step_budget: float = 0.001) -> None:
        self.client = client
        self.step_budget = step_budget
        self._busy = False
        self._asked_in_step = False
        self._spent = 0.0
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[str, object, list[str]]] = collections.deque()
        self._asked: dict[str, object] = {}  # req_id -> token of its newest job
        self._replies: dict[str, LookupReply] = {}
        self._closed = False
        self.waited_seconds: list[float] = []  # per idle step that waited, for the interference benchmark
        self.busy_steps_asked = 0  # busy steps that asked while an answer was pending (and did not wait)
        self._thread = start_thread(self._run, "kvcache-lookup-client")

    def new_step(self, busy: bool = False) -> None:
        """A scheduler step begins; ``busy``: the last one computed something (others are running)."""
        if self._busy and self._asked_in_step:
            self.busy_steps_asked += 1
        if self._spent > 0:
            self.waited_seconds.append(self._spent)
            del self.waited_seconds[:-4096]
        self._busy, self._asked_in_step, self._spent = busy, False, 0.0

    def reply(self, req_id: str, hashes: Sequence[str]) -> LookupReply | None:
        with self._cond:
            if req_id not in self._asked:
                token = object()
                self._asked[req_id] = token
                self._queue.append((req_id, token, list(hashes)))
                self._cond.notify_all()
            budget_left = 0.0 if self._busy else self.step_budget - self._spent
            if req_id not in self._replies and budget_left > 0:
                start = time.perf_counter()
                self._cond.wait_for(lambda: req_id in self._replies, budget_left)
                self._spent += time.perf_counter() - start
            reply = self._replies.pop(req_id, None)
            if reply is not None:
                del self._asked[req_id]
            else:
                self._asked_in_step = True
            return reply

    def wait_summary(self) -> dict[str, float]:
        """How long idle steps waited for lookup answers (those that waited at all; the last 4096),
        and how many busy steps asked without waiting."""
        waits = sorted(self.waited_seconds)
        summary = {"busy_steps_asked": self.busy_steps_asked, "steps": len(waits)}
        if not waits:
            return {**summary, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}

        def ms(q: float) -> float:
            return round(1e3 * waits[min(len(waits) - 1, int(q * len(waits)))], 3)

        return {**summary, "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": round(1e3 * waits[-1], 3)}

    def discard(self, req_id: str) -> None:
        """Forget a request's lookup (finished or aborted while it was pending)."""
        with self._cond:
            self._asked.pop(req_id, None)
            self._replies.pop(req_id, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                req_id, token, hashes = self._queue.popleft()
                if self._asked.get(req_id) is not token:
                    continue  # discarded meanwhile
            reply = self.client.lookup(hashes)
            with self._cond:
                if self._asked.get(req_id) is token:
                    self._replies[req_id] = reply
                    self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.client.close()
