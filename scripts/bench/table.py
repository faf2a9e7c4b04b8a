#!/usr/bin/env python3
"""Builds the measured table of BENCHMARKS.md from one scripts/bench-report.sh run.

Usage: table.py RESULTS_DIR CRITERION_DIR SINCE_EPOCH > table.md
Reads compare.json, batch-*.json and overload-*.json from RESULTS_DIR, and the criterion
estimates written after SINCE_EPOCH; every figure is the median of the runs it lists.
"""
import glob
import json
import os
import platform
import sys


def median(values):
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else 0


def load(pattern):
    return [json.load(open(p)) for p in sorted(glob.glob(pattern))]


def main():
    results, criterion_dir, since = sys.argv[1], sys.argv[2], float(sys.argv[3])
    compare = json.load(open(os.path.join(results, "compare.json")))
    batches = load(os.path.join(results, "batch-*.json"))
    overloads = load(os.path.join(results, "overload-*.json"))
    meta = json.load(open(os.path.join(results, "meta.json")))
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    rows = []

    commands = {}

    def key(command):
        # Each command once, under the table; rows refer to it by letter.
        return commands.setdefault(command, "ABCDEFGH"[len(commands)])

    def row(figure, values, fmt, command):
        rows.append((figure, fmt(median(values)), ", ".join(fmt(v) for v in values), key(command)))

    runs = compare["runs"]
    null = [r["request_rate"] for r in runs if r["server"] == "null-server"]
    apex = [r["success_rate"] for r in runs if r["server"] == "apex-server"]
    ratios = [a / n for a, n in zip(apex, null)]
    half = [r["p99_us"] / 1000 for r in runs if r["server"] == "half-load"]
    cmp_cmd = meta["compare_command"]
    n = lambda v: f"{v:,.0f}"
    row("`track` req/s, null-server (closed loop)", null, n, cmp_cmd)
    row("`track` req/s, apex-server, 2xx (closed loop)", apex, n, cmp_cmd)
    rows.append(("ratio apex / null (of the medians)", f"{compare['ratio']:.2f}",
                 "per round: " + ", ".join(f"{r:.2f}" for r in ratios), key(cmp_cmd)))
    if half:
        row(f"p99 at half load, ms (open loop, {compare['half_load_rate']:,.0f} req/s, from intended send time)",
            half, lambda v: f"{v:.2f}", cmp_cmd)
    if batches:
        passed = all((b.get("verify") or {}).get("passed") for b in batches)
        e2e = [b["records"]["accepted"] / (b["elapsed_s"] + b["verify"]["settled_after_s"]) for b in batches]
        acked = [b["record_rate"] for b in batches]
        settle = [b["verify"]["settled_after_s"] for b in batches]
        row(f"batch records/s end to end (1,000-record batches, until both stores hold them; --verify {'passed' if passed else 'FAILED'})",
            e2e, n, meta["batch_command"])
        row("batch records/s acknowledged (durable in the log)", acked, n, meta["batch_command"])
        row("seconds from the end of the load until both stores hold it", settle, lambda v: f"{v:.2f}", meta["batch_command"])
    if overloads:
        rss = [o["max_rss_bytes"] / 2**20 for o in overloads]
        refused = [o["outcomes"].get("503", 0) / max(o["requests"], 1) * 100 for o in overloads]
        ok = [o["success_rate"] for o in overloads]
        rate = overloads[0]["target_rate"]
        sent = [o["request_rate"] for o in overloads]
        missed = [o["missed"] / max(o["missed"] + o["requests"], 1) * 100 for o in overloads]
        p99 = [o["latency"]["p99_us"] / 1000 for o in overloads]
        row(f"apex-server RSS max, MiB, at 2x overload ({rate:,.0f} req/s offered) for {meta['overload_secs']} s",
            rss, lambda v: f"{v:.1f}", meta["overload_command"])
        row("requests/s the client got out during that overload", sent, n, meta["overload_command"])
        row("% of the offered requests never sent (client behind schedule)", missed, lambda v: f"{v:.1f}", meta["overload_command"])
        row("2xx req/s during that overload", ok, n, meta["overload_command"])
        row("% of sent requests answered 503 during that overload", refused, lambda v: f"{v:.1f}", meta["overload_command"])
        row("p99 latency during that overload, ms (from the intended send time)", p99, lambda v: f"{v:,.0f}", meta["overload_command"])
    for path in sorted(glob.glob(os.path.join(criterion_dir, "**", "new", "estimates.json"), recursive=True)):
        if os.path.getmtime(path) < since:
            continue
        bench = os.path.relpath(os.path.dirname(os.path.dirname(path)), criterion_dir)
        estimate = json.load(open(path))["median"]["point_estimate"]
        unit = f"{estimate:.1f} ns" if estimate < 1e3 else f"{estimate / 1e3:.1f} µs" if estimate < 1e6 else f"{estimate / 1e6:.2f} ms"
        rows.append((f"criterion `{bench}` (median)", unit, "", key(meta["criterion_command"])))

    print(f"Measured {meta['date']} on {os.cpu_count()} cores ({cpu}), load generator on the same machine; "
          f"median of {meta['rounds']} runs unless the row says otherwise.\n")
    print("| figure | median | runs | command |")
    print("|---|---|---|---|")
    for figure, value, values, command in rows:
        print(f"| {figure} | {value} | {values} | {command} |")
    print()
    for command, letter in commands.items():
        print(f"- {letter}: `{command}`")


main()
