"""``vllm-kvcache``: check a configuration before vLLM starts, see what a store holds, purge a model.

Exit status: 0 when everything named works, 1 with one line on stderr when something does not (the
same line start-up would log), 2 for a command line argparse rejects.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from . import admin
from .config import CONFIG_FILE_ENV
from .connectors.base import DEFAULT_PAGE_SIZE
from .errors import KVCacheError
from .settings import load_settings

PROG = "vllm-kvcache"
PROGRESS_EVERY_SECS = 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Operator tools of vllm-kvcache-plugin: check a configuration before vLLM "
        "starts, see what a store holds, purge a model's chunks. `vllm-kvcache COMMAND --help` for each.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--extra-config", metavar="JSON",
                       help="settings as vLLM's kv_connector_extra_config gives them (highest precedence)")
        p.add_argument("--kv-transfer-config", metavar="JSON",
                       help="vLLM's whole --kv-transfer-config value; its kv_connector_extra_config is used")

    check = sub.add_parser(
        "check", help="read the configuration as the connector does, then test the disk folder and the remote",
        description="Read the configuration exactly as the connector does (defaults < "
        f"{CONFIG_FILE_ENV} < LMCACHE_* < the extra config), print every setting and where it came from "
        "(passwords and tokens redacted), then open the local disk folder and the remote store: connect, "
        f"time a round trip, and put / get / delete {admin.PROBE_VALUES} throwaway values of "
        f"{admin.PROBE_VALUE_BYTES >> 20} MiB. Exits 1 with the one-line error start-up would give.")
    config_flags(check)

    listing_note = ("Stores list a page at a time (lm, the redis family: SCAN, fs: a lazy walk); Mooncake "
                    "sends its whole key dump in one reply by its design (it needs metrics_address, the "
                    "master's --metrics_port); blackhole keeps nothing. The local disk tier (local_disk) "
                    "names files by a hash of the key: delete its folder to drop it.")
    inspect = sub.add_parser(
        "inspect", help="chunks and bytes per model, world size and rank in a store",
        description="Count the chunks and bytes a store holds per model, world size and rank, and keys "
        "that are not chunk keys. " + listing_note)
    inspect.add_argument("url", nargs="?", help="the store (default: the configured remote_url)")
    inspect.add_argument("--model", help="only this model's chunks (the name in the keys: model_name, "
                         "else vLLM's --model)")
    _listing_flags(inspect)
    config_flags(inspect)

    purge = sub.add_parser(
        "purge", help="delete one model's chunks (after you update its weights under the same name)",
        description="Delete one model's chunks from a store (with --all: every model's), printing what was "
        "deleted; keys that are not chunk keys stay. vLLM instances still running keep the chunks in "
        "their CPU hot cache and local disk: restart them (with an empty local_disk folder). " + listing_note)
    purge.add_argument("url", nargs="?", help="the store (default: the configured remote_url)")
    which = purge.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="the model whose chunks go (the name in the keys)")
    which.add_argument("--all", action="store_true", help="every model's chunks")
    purge.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    _listing_flags(purge)
    config_flags(purge)
    return parser


def _listing_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--page-size", type=_page_size, default=DEFAULT_PAGE_SIZE,
                   help=f"keys asked for per round trip (default {DEFAULT_PAGE_SIZE})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _page_size(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 4096:
        raise argparse.ArgumentTypeError(f"{text!r} is not a page size in 1..4096")
    return int(text)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        config = load_settings(_extra_config(args), os.environ, source="--extra-config")
        return {"check": _check, "inspect": _inspect, "purge": _purge}[args.command](args, config, out, err)
    except (KVCacheError, ValueError) as exc:
        print(f"{PROG} {args.command}: {exc}", file=err)
        return 1


def _extra_config(args: argparse.Namespace) -> dict[str, Any] | None:
    extra: dict[str, Any] = {}
    if args.kv_transfer_config:
        transfer = _json_object(args.kv_transfer_config, "--kv-transfer-config")
        extra.update(_json_object(transfer.get("kv_connector_extra_config") or {}, "kv_connector_extra_config"))
    if args.extra_config:
        extra.update(_json_object(args.extra_config, "--extra-config"))
    return extra or None


def _json_object(raw: Any, flag: str) -> dict[str, Any]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{flag} is not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{flag} must be a JSON object, got {type(raw).__name__}")
    return raw


# -- check ------------------------------------------------------------------------------------
def _check(args: argparse.Namespace, config: Any, out: TextIO, err: TextIO) -> int:
    settings = admin.effective_settings(config)
    width = max(len(s.key) for s in settings)
    print("Configuration (source: default < LMCACHE_CONFIG_FILE < LMCACHE_* < --extra-config):", file=out)
    for s in settings:
        print(f"  {s.key:<{width}}  {s.value}  [{s.source}]", file=out)
    disk = admin.check_disk(config)
    if disk is None:
        print("Local disk: off (local_disk unset)", file=out)
    else:
        print(f"Local disk: {disk.path}: writable, {disk.free_bytes / 1e9:.1f} GB free, budget "
              f"{disk.budget_bytes / 1e9:g} GB", file=out)
        if disk.free_bytes < disk.budget_bytes:
            print(f"  warning: less free space than max_local_disk_size ({disk.budget_bytes / 1e9:g} GB)", file=err)
    remote = admin.check_remote(config)
    if remote is None:
        print("Remote: none (remote_url unset)", file=out)
    else:
        line = (f"Remote: {remote.url}: connected in {remote.connect_ms:.1f} ms, round trip "
                f"{remote.round_trip_ms:.2f} ms (median of {admin.PINGS})")
        if remote.put_gb_per_sec is None:
            line += "; it keeps nothing, so nothing was put or read back"
        else:
            line += (f", {remote.probe_bytes / 1e6:.1f} MB put at {remote.put_gb_per_sec:.2f} GB/s, read back "
                     f"intact at {remote.get_gb_per_sec:.2f} GB/s (throwaway keys deleted)")
        print(line, file=out)
    print("OK", file=out)
    return 0


# -- inspect / purge --------------------------------------------------------------------------
def _store_url(args: argparse.Namespace, config: Any) -> str:
    url = args.url or config.remote_url
    if not url:
        raise ValueError("no store named: give a URL, or set remote_url (LMCACHE_REMOTE_URL, LMCACHE_CONFIG_FILE)")
    return url


class _ProgressLine:
    """A line on stderr at most once a second while a big store is listed (overwritten on a tty)."""

    def __init__(self, err: TextIO, what: str) -> None:
        self.err, self.what = err, what
        self.start = self.last = time.monotonic()
        self.shown = False
        self.tty = err.isatty()

    def __call__(self, seen: int) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_SECS:
            return
        self.last, self.shown = now, True
        text = f"{self.what}: {seen:,} keys listed ({now - self.start:.0f} s)"
        print("\r" + text if self.tty else text, end="" if self.tty else "\n", file=self.err, flush=True)

    def done(self) -> None:
        if self.shown and self.tty:
            print(file=self.err)


def _inspect(args: argparse.Namespace, config: Any, out: TextIO, err: TextIO) -> int:
    progress = _ProgressLine(err, "inspect")
    inventory = admin.inspect_store(config, _store_url(args, config), args.model, args.page_size, progress)
    progress.done()
    _print_inventory(inventory, out, args.json, "holds")
    return 0


def _purge(args: argparse.Namespace, config: Any, out: TextIO, err: TextIO) -> int:
    model = None if args.all else args.model
    progress = _ProgressLine(err, "purge")
    report = admin.purge_store(config, _store_url(args, config), model, args.dry_run, args.page_size, progress)
    progress.done()
    verb = "would delete" if report.dry_run else "deleted"
    _print_inventory(report.deleted, out, args.json, verb, {"dry_run": report.dry_run, "remaining": report.remaining})
    if report.remaining:
        print(f"{PROG} purge: {report.remaining} chunk keys still listed after {admin.PURGE_PASSES} passes "
              "(written meanwhile by a running vLLM?)", file=err)
        return 1
    return 0


def _print_inventory(inv: admin.Inventory, out: TextIO, as_json: bool, verb: str,
                     extra: dict[str, Any] | None = None) -> None:
    rows = sorted(inv.groups.items())
    if as_json:
        doc = {"url": inv.url, "listing": inv.listing, "sizes_known": inv.sizes_known,
               "models": {}, "other_keys": {"keys": inv.other.chunks, "bytes": inv.other.bytes}, **(extra or {})}
        for (model, world_size, rank), tally in rows:
            doc["models"].setdefault(model, []).append(
                {"world_size": world_size, "rank": rank, "chunks": tally.chunks, "bytes": tally.bytes})
        print(json.dumps(doc, indent=1), file=out)
        return
    chunks = sum(t.chunks for _, t in rows)
    total = sum(t.bytes for _, t in rows)
    models = len(inv.models)
    print(f"{inv.url} {verb} {chunks:,} chunks ({_size(total, inv)}) of {models} model{'' if models == 1 else 's'}"
          f" (listing: {inv.listing})", file=out)
    if rows:
        width = max(len("model"), *(len(model) for (model, _, _), _ in rows))
        print(f"  {'model':<{width}}  world_size  rank  {'chunks':>9}  {'bytes':>10}", file=out)
        for (model, world_size, rank), tally in rows:
            print(f"  {model:<{width}}  {world_size:>10}  {rank:>4}  {tally.chunks:>9,}  {_size(tally.bytes, inv):>10}",
                  file=out)
    if inv.other.chunks:
        print(f"  and {inv.other.chunks:,} other keys ({_size(inv.other.bytes, inv)}) that are not chunk keys",
              file=out)


def _size(nbytes: int, inv: admin.Inventory) -> str:
    text = f"{nbytes / 1e6:.1f} MB"
    return text if inv.sizes_known else text + " (some sizes unknown)"


if __name__ == "__main__":
    sys.exit(main())
