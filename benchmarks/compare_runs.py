"""Compare two runs of the kernel, connector and TTFT benchmarks (e.g. before and after a change),
ratio by ratio, and flag every one that got worse by more than a threshold.

    python benchmarks/compare_runs.py --before DIR [DIR ...] --after DIR [DIR ...] [--worse 0.10] [--out report.md]

Each folder holds ``kernels/results.json`` (bench_kernels.py), ``connectors/bench_connectors.json``
(bench_connectors.py) and ``ttft/ttft.md`` (bench_ttft.py), as written with ``--out DIR/<name>``.
Ratios, not raw times, are compared: each is measured against its own baseline in the same run
(a plain copy, the store's raw client, vLLM's own prefix-cache hit), which cancels most of the
machine's load. Direction: "higher" ratios are better unless the name says otherwise. On a shared
2-core VM one run's ratios swing by +-10% between identical code (measured: runs of the same
commit disagreed by more than 10% on half the connector ratios), so give several runs a side:
each ratio's median over them is compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import fmt, markdown_table  # noqa: E402


def kernel_ratios(folder: Path) -> dict[str, tuple[float, bool]]:
    rows = json.loads((folder / "kernels" / "results.json").read_text())["rows"]
    return {f"kernels {r['shape']} {r['layout']} {r['implementation']} {r['direction']} (% of copy)":
            (r["ratio"], True) for r in rows}


def connector_ratios(folder: Path) -> dict[str, tuple[float, bool]]:
    rows = json.loads((folder / "connectors" / "bench_connectors.json").read_text())["rows"]
    out = {}
    for r in rows:
        if r.get("ratio") is not None:
            out[f"connectors {r['case']} {r['tokens']} {r['op']} (vs raw client)"] = (r["ratio"], True)
        elif r["case"] == "lm":  # no raw client: its rate (the LMCache figures are constants)
            out[f"connectors {r['case']} {r['tokens']} {r['op']} ({r['unit']})"] = (r["conn_rate"], True)
    return out


def ttft_ratios(folder: Path) -> dict[str, tuple[float, bool]]:
    text = (folder / "ttft" / "ttft.md").read_text()
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1].isdigit():  # store, tokens, cold, vLLM hit, restart hit, ratios
            store, tokens = cells[0], cells[1]
            out[f"ttft {store} {tokens} hit / vLLM hit (lower is better)"] = (float(cells[5]), False)
            out[f"ttft {store} {tokens} cold / hit"] = (float(cells[6]), True)
    return out


def medians(folders: list[Path], reader) -> dict[str, tuple[float, bool]]:
    """Each ratio's median over the runs that have it."""
    runs = []
    for folder in folders:
        try:
            runs.append(reader(folder))
        except FileNotFoundError:  # that benchmark was not run into this folder
            continue
    out = {}
    for name in set().union(*runs) if runs else ():
        values = [run[name] for run in runs if name in run]
        out[name] = (statistics.median(v for v, _ in values), values[0][1])
    return out


def compare(before: list[Path], after: list[Path], worse: float) -> tuple[list[list[str]], list[str]]:
    rows, flagged = [], []
    for reader in (kernel_ratios, connector_ratios, ttft_ratios):
        old, new = medians(before, reader), medians(after, reader)
        for name in sorted(set(old) & set(new)):
            (a, higher_better), (b, _) = old[name], new[name]
            change = (b - a) / a if a else 0.0
            got_worse = -change if higher_better else change
            mark = "WORSE" if got_worse > worse else ""
            if mark:
                flagged.append(name)
            rows.append([name, fmt(a, 3), fmt(b, 3), f"{change * 100:+.1f}%", mark])
    return rows, flagged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--before", type=Path, nargs="+", required=True, help="result folders of the baseline")
    parser.add_argument("--after", type=Path, nargs="+", required=True, help="result folders of the change")
    parser.add_argument("--worse", type=float, default=0.10, help="flag a ratio worse by more than this (0.10)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    rows, flagged = compare(args.before, args.after, args.worse)
    header = ["ratio", f"before (median of {len(args.before)})", f"after (median of {len(args.after)})", "change",
              f"worse by > {args.worse:.0%}"]
    table = markdown_table(header, rows)
    summary = f"{len(rows)} ratios compared, {len(flagged)} worse by more than {args.worse:.0%}"
    print(table + "\n\n" + summary)
    if args.out:
        args.out.write_text(table + "\n\n" + summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
