"""Shared by the benchmarks: measure a child process alone; print a result table (or JSON)."""

import json
import os
import subprocess
import sys
import time


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[str, int, float]:
    """Run `cmd`; return (its stdout, its own peak RSS in bytes via wait4, wall seconds).

    Exits with a message when the command fails. The caller should hold little memory itself:
    nothing it holds counts, but a child forked from a large parent can start large.
    """
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if status:
        sys.exit(f"{' '.join(cmd[:4])} ... failed (status {status})")
    return out, usage.ru_maxrss * 1024, wall  # Linux reports KiB


def report(as_json: bool, probes: dict, rows: list[dict], subject: str,
           columns: list[tuple[str, str, int, str]]):
    """Print `rows` as JSON (with the probes) or as a table under a line naming the probes.

    Args:
      as_json: print {"probes": ..., "rows": ...} instead of the table.
      probes: `mixtral_jax.bench.machine_probes()`.
      rows: one dict per table row.
      subject: what was measured, printed after the probes.
      columns: (row key, header, width, format spec such as ".2f") per column.
    """
    if as_json:
        print(json.dumps({"probes": probes, "rows": rows}))
        return
    print(f"read bandwidth {probes['read_bandwidth'] / 1e9:.1f} GB/s, matmul peak "
          f"{probes['matmul_peak'] / 1e9:.0f} GFLOP/s; {subject}")
    print(" ".join(f"{header:>{width}}" for _, header, width, _ in columns))
    for r in rows:
        print(" ".join(f"{r[key]:>{width}{fmt}}" for key, _, width, fmt in columns))
