"""Hands the arena's fd to clients on the same host: a Linux abstract unix socket, one short
exchange per client, on a thread of its own (it blocks on sockets; the event loop must not).

Who gets the fd: a client that completed HELLO (so presented the token) on a TCP connection asks
SHM_ATTACH there and receives a one-time nonce and this socket's name; it connects here, sends the
nonce, and the peer's uid (SO_PEERCRED, from the kernel, not the client) must be the server's own.
Only then is the fd sent (SCM_RIGHTS). The nonce ties the fd to an authenticated connection, and
a client that reached another server's socket of the same name gets no fd it could mistake for
ours (it also checks the arena id written at the start of the mapping).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import threading
import time

from ..threads import start_thread

logger = logging.getLogger("vllm_kvcache_plugin.server")

NONCE_BYTES = 16
NONCE_TTL_SECS = 30.0
EXCHANGE_TIMEOUT_SECS = 2.0


class FdServer:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.name = f"vllm-kvcache-lm-{os.getpid()}-{secrets.token_hex(8)}"
        self.attaches = self.refused = 0
        self._nonces: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.bind("\0" + self.name)
        self._sock.listen(64)
        self._thread = start_thread(self._serve, "lm-shm-fd")

    def issue_nonce(self) -> bytes:
        now = time.monotonic()
        nonce = secrets.token_bytes(NONCE_BYTES)
        with self._lock:
            for old in [n for n, expiry in self._nonces.items() if expiry < now]:
                del self._nonces[old]
            self._nonces[nonce] = now + NONCE_TTL_SECS
        return nonce

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=1.0)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            start_thread(self._exchange, "lm-shm-exchange", args=(conn,))

    def _exchange(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(EXCHANGE_TIMEOUT_SECS)
                _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                if uid != os.getuid():
                    self._refuse(conn, b"UID", f"peer uid {uid} is not the server's")
                    return
                nonce = b""
                while len(nonce) < NONCE_BYTES:
                    part = conn.recv(NONCE_BYTES - len(nonce))
                    if not part:
                        return
                    nonce += part
                with self._lock:
                    expiry = self._nonces.pop(nonce, 0.0)
                if expiry < time.monotonic():
                    self._refuse(conn, b"NONCE", "unknown or expired nonce")
                    return
                socket.send_fds(conn, [b"OK"], [self.fd])
                self.attaches += 1
            except OSError as exc:
                logger.debug("shared-memory attach failed: %s", exc)

    def _refuse(self, conn: socket.socket, code: bytes, why: str) -> None:
        self.refused += 1
        logger.warning("shared-memory attach refused: %s", why)
        conn.sendall(code)
