"""Streaming top-K selection at the paper's scale: time, rows/s and peak memory vs pool size.

    python benchmarks/scale.py                  # 1M, 3M, 10M rows; writes reports/benchmarks/scale.{md,json}
    python benchmarks/scale.py --rows 200000 --threads 2   # one size, printed only

Synthetic score rows (1,000 classes, uniform random in [0, 1), seeded per chunk so a row's scores do
not depend on the chunking) are generated on the fly, CHUNK rows at a time, and fed to
`sstl.pseudo.stream.TopK(1000, k=16000, p=10)` (Yalniz et al. 2019: K = 16k images per class, each image
competing for its top P = 10 classes). No more than one chunk of scores exists at any time.

Each run is a fresh process, so that its peak RSS (ru_maxrss) is its own. The sizes run with one
torch thread; 1M rows runs again with one thread per core, for comparison (on a busy machine the
second thread mostly waits: the selection's tensor operations are small). `baseline` is the
peak RSS of that process after importing torch, before any score exists; `peak - baseline` is what
the selection costs. Timings: `generate` = making the synthetic scores (a stand-in for the teacher,
not part of the selection), `select` = TopK.update + result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from sstl.core.files import write_json, write_text
from sstl.pseudo.stream import TopK

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "benchmarks"
CLASSES, K, P = 1000, 16_000, 10
CHUNK = 16_384  # rows per generated chunk: 64 MB of float32 scores
SEED = 0
RUNS = ((1_000_000, 1), (3_000_000, 1), (10_000_000, 1), (1_000_000, os.cpu_count() or 1))  # (rows, threads)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(rows: int, threads: int) -> dict[str, float | int]:
    """Stream `rows` synthetic score rows through TopK; the figures of this process."""
    torch.set_num_threads(threads)
    baseline = peak_rss_mb()
    acc = TopK(CLASSES, K, P)
    generate = select = 0.0
    for start in range(0, rows, CHUNK):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(SEED * 1_000_003 + start // CHUNK)
        scores = torch.rand(min(CHUNK, rows - start), CLASSES, generator=g)  # (n, C)
        t1 = time.perf_counter()
        acc.update(scores, torch.arange(start, start + len(scores)))
        generate, select = generate + t1 - t0, select + time.perf_counter() - t1
    t0 = time.perf_counter()
    index, _, _ = acc.result()
    select += time.perf_counter() - t0
    peak = peak_rss_mb()
    return {
        "rows": rows,
        "threads": threads,
        "selected": len(index),
        "generate_s": round(generate, 1),
        "select_s": round(select, 1),
        "total_s": round(generate + select, 1),
        "select_rows_per_s": round(rows / select),
        "baseline_rss_mb": round(baseline),
        "peak_rss_mb": round(peak),
        "selection_mb": round(peak - baseline),
        "state_mb": round(K * CLASSES * 8 / 2**20),  # TopK.keys: int64 (K, C)
    }


def machine() -> dict[str, str | int | float]:
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": commit.stdout.strip() or "unknown",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def markdown(env: dict[str, str | int | float], records: list[dict[str, float | int]]) -> str:
    head = (
        "| rows | threads | selected | select s | select rows/s | generate s | peak RSS MB | baseline MB "
        "| peak − baseline MB |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r['rows']:,} | {r['threads']} | {r['selected']:,} | {r['select_s']} | {r['select_rows_per_s']:,} "
        f"| {r['generate_s']} | {r['peak_rss_mb']:,} | {r['baseline_rss_mb']:,} | {r['selection_mb']:,} |\n"
        for r in records
    )
    largest = max(int(r["rows"]) for r in records)
    return (
        "# Streaming top-K selection at scale\n\n"
        f"`python benchmarks/scale.py`: synthetic score rows, {CLASSES:,} classes, K = {K:,} per class, "
        f"P = {P} classes per image, {CHUNK:,} rows per chunk, each run in a fresh process.\n\n"
        f"Machine: {env['cpu']}, {env['cores']} cores, 1-min load average {env['load_average_1min']} at start "
        f"(a shared machine: other jobs were running); {env['date']}; git {env['git_commit']}; "
        f"Python {env['python']}, torch {env['torch']}.\n\n"
        + head
        + body
        + "\n`select` = TopK.update + result (the selection); `generate` = making the random scores (stands in "
        "for the teacher). Peak RSS is ru_maxrss of the process; baseline = its peak after importing torch. "
        f"The kept state is K × classes int64 keys = {records[0]['state_mb']} MB; pending candidates (up to "
        "K × classes) and one compaction's sort (a block of classes at a time) come on top. Memory grows until "
        "every class has seen about K candidates, then stays flat: it depends on K × classes, not on the pool. "
        f"Held in memory instead, {largest:,} × {CLASSES:,} float32 scores would take "
        f"{largest * CLASSES * 4 / 2**30:.0f} GiB.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, help="run one size in this process and print its record as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for --rows (default 1)")
    args = parser.parse_args()
    if args.rows:
        print(json.dumps(run(args.rows, args.threads)))
        return
    env, records = machine(), []
    for rows, threads in RUNS:
        cmd = [sys.executable, __file__, "--rows", str(rows), "--threads", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"{rows} rows, {threads} threads failed:\n{res.stderr}")
        records.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(records[-1], flush=True)
    settings = {"classes": CLASSES, "k": K, "p": P, "chunk_rows": CHUNK, "seed": SEED}
    write_json(OUT / "scale.json", {"machine": env, "settings": settings, "records": records})
    write_text(OUT / "scale.md", markdown(env, records))
    print(f"wrote {OUT / 'scale.md'} and {OUT / 'scale.json'}")


if __name__ == "__main__":
    main()
