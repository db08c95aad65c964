"""Render the newest benchmark results as Markdown; ``--readme [FILE]`` rewrites the table between the
``<!-- bench:start -->`` and ``<!-- bench:end -->`` markers in FILE (docs/benchmarks.md when no FILE is given).

The newest run of each kind (machine, stage, extraction variants asked for), one row per measured variant, less
the rows that a newer run shown measured again (same variant and item count): a run of one ``--extract-modes``
replaces the naive and per-backbone rows of the suite's run but keeps its other modes. Ratios are computed when
measured and only ever compare rows of the same run (same time and commit), so a row's "x naive" is to its own
run's naive baseline, which may have been replaced in the table by a newer one. "steady per s" leaves start-up
out: a loader epoch or an extraction loop after the loader's first batch (extraction rows recorded before that
was: the extraction loop alone, store creation excluded).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .harness import RESULTS

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"  # where the table is shown


def _machine(row: dict) -> str:
    m = row["machine"]
    gpus = ", ".join(g["name"] for g in m.get("gpus", [])) or "no GPU"
    return f"{m['cpu']} ({m['cores']} cores), {gpus}"


def _run_kind(row: dict) -> tuple:
    """Runs of one kind replace each other in the table: same machine, stage, extraction variants asked for
    (``--extract-modes``, runs from before it timed eager and compiled; ``--engines``) and weights given."""
    params = row["params"]
    return (_machine(row), row["stage"], tuple(params.get("modes", ("eager", "default"))),
            tuple(params.get("engines", ())), tuple(sorted((params.get("weights") or {}).items())))


def _measurement(row: dict) -> tuple:
    return _machine(row), row["stage"], row["variant"], row["items"]


def _newest(rows: list[dict], key) -> list[dict]:
    """The rows whose run is the newest among the rows of their ``key``."""
    newest: dict[tuple, str] = {}
    for row in rows:
        newest[key(row)] = max(newest.get(key(row), ""), row["time_utc"])
    return [r for r in rows if newest[key(r)] == r["time_utc"]]


def latest_runs(path: Path = RESULTS) -> list[dict]:
    """Rows of the newest run of each kind, less those a newer run among them measured again."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return _newest(_newest(rows, _run_kind), _measurement)


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| machine | stage | variant | n (cells or rows) | seconds | per s | steady per s | x naive | x naive-full "
             "| of floor | warm-up (s for n) | run (UTC), commit |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        commit = (r.get("git_commit") or "?")[:8]
        floor = f"{r['floor_fraction']:.1%}" if "floor_fraction" in r else ""
        first = r.get("first_run_seconds")
        warmup = "" if first is None else f"{first:.1f} for {r.get('first_run_items') or r['items']:,}"
        steady = r.get("after_first_batch_per_s") or r.get("loop_images_per_s")
        lines.append(f"| {_machine(r)} | {r['stage']} | {r['variant']} | {r['items']:,} | {r['seconds_median']:.2f} "
                     f"| {r['items_per_s']:,.1f} | {'' if steady is None else f'{steady:,.1f}'} "
                     f"| {_ratio(r.get('x_naive'))} | {_ratio(r.get('x_naive_full'))} "
                     f"| {floor} | {warmup} | {r['time_utc']}, {commit} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, nargs="?", const=PAGE, metavar="FILE",
                        help="rewrite the table between the bench markers in FILE (default: docs/benchmarks.md)")
    args = parser.parse_args(argv)
    table = markdown(latest_runs(args.results))
    if args.readme:
        text = args.readme.read_text()
        if START not in text or END not in text:
            raise SystemExit(f"{args.readme} has no {START} ... {END} markers")
        args.readme.write_text(re.sub(f"{START}.*?{END}", f"{START}\n{table}\n{END}", text, flags=re.S))
    print(table)


if __name__ == "__main__":
    main()
