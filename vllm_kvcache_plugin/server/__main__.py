"""Command line of the lm:// server: ``python -m vllm_kvcache_plugin.server --help``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys

from ..lm_protocol import Limits
from .app import LMServer, ServerConfig

logger = logging.getLogger("vllm_kvcache_plugin.server")
GB = 10**9


def _positive(kind: type, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number ({what})") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive ({what})")
        return value

    return parse


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number in 0..65535")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-kvcache-server",
        description="The lm:// KV-cache server: keeps values in memory (LRU within --max-size-gb), "
        "optionally spilling evicted values to --disk. Clients connect with remote_url lm://HOST:PORT.",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; other addresses expose the store "
                        "to the network: set --token then)")
    parser.add_argument("--port", type=_port, default=65432, help="TCP port (default 65432; 0 picks a free one)")
    parser.add_argument("--max-size-gb", type=_positive(float, "GB"), default=4.0,
                        help="memory budget in GB (10^9 bytes) for stored values plus values still arriving; "
                        "least recently used values are evicted beyond it (default 4)")
    parser.add_argument("--disk", metavar="PATH",
                        help="folder for values evicted from memory (one file each; reused after a restart)")
    parser.add_argument("--max-disk-gb", type=_positive(float, "GB"), default=None,
                        help="disk budget in GB for --disk, least recently used files deleted beyond it (default 10)")
    parser.add_argument("--token", help="shared secret clients must present (lm://host:port?token=SECRET); "
                        "default: the LM_SERVER_TOKEN environment variable, else no token")
    parser.add_argument("--metrics-port", type=_port, default=None,
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
    parser.add_argument("--max-value-mb", type=_positive(float, "MB"), default=1024.0,
                        help="largest value accepted, in MB (default 1024)")
    parser.add_argument("--handshake-timeout", type=_positive(float, "seconds"), default=10.0,
                        help="close connections that have not sent HELLO within this many seconds (default 10)")
    parser.add_argument("--frame-timeout", type=_positive(float, "seconds"), default=60.0,
                        help="close connections that stop sending in the middle of a frame for this many "
                        "seconds (default 60)")
    parser.add_argument("--no-shm", action="store_true",
                        help="keep values in ordinary memory and serve every client over TCP (default: values "
                        "live in a shared-memory arena that clients on the same host and uid read directly)")
    parser.add_argument("--lease-secs", type=_positive(float, "seconds"), default=10.0,
                        help="how long a shared-memory read lease keeps a value's memory from being reused "
                        "(default 10)")
    parser.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"],
                        help="event loop: uvloop is faster per request (auto: uvloop when installed)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level (default INFO)")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    if args.max_disk_gb is not None and not args.disk:
        raise SystemExit("vllm-kvcache-server: error: --max-disk-gb needs --disk PATH")
    return ServerConfig(
        host=args.host,
        port=args.port,
        max_bytes=int(args.max_size_gb * GB),
        disk_path=args.disk,
        max_disk_bytes=int((args.max_disk_gb or 10.0) * GB),
        token=args.token or os.environ.get("LM_SERVER_TOKEN") or None,
        metrics_port=args.metrics_port,
        limits=Limits(max_value_size=int(args.max_value_mb * 10**6)),
        handshake_timeout_secs=args.handshake_timeout,
        frame_timeout_secs=args.frame_timeout,
        shm=not args.no_shm,
        lease_secs=args.lease_secs,
    )


def _raise_fd_limit() -> None:
    """Thousands of client connections need thousands of file descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


async def serve(config: ServerConfig) -> None:
    server = LMServer(config)
    await server.start()
    disk = f", disk {config.disk_path} ({config.max_disk_bytes / GB:g} GB)" if config.disk_path else ""
    metrics = f", metrics http://{config.host}:{config.metrics_port}/metrics" if config.metrics_port else ""
    shm = f"on (leases {config.lease_secs:g} s)" if server.arena is not None else "off"
    logger.info("lm server listening on %s:%d, memory budget %g GB%s, token %s%s, shared memory %s", config.host,
                server.port, config.max_bytes / GB, disk, "required" if config.token else "off", metrics, shm)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("lm server stopping")
    await server.stop()


def _runner(choice: str):
    """asyncio.run, or uvloop's (about 15% less CPU per small request) when installed."""
    if choice == "asyncio":
        return asyncio.run
    try:
        import uvloop
    except ImportError:
        uvloop = None
    run = getattr(uvloop, "run", None)  # uvloop >= 0.18
    if run is None and choice == "uvloop":
        raise SystemExit("vllm-kvcache-server: error: --loop uvloop needs the uvloop package (>= 0.18)")
    return run or asyncio.run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    _raise_fd_limit()
    try:
        _runner(args.loop)(serve(config))
    except OSError as exc:  # port taken, address not available, disk folder not writable
        print(f"vllm-kvcache-server: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
