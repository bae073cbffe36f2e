"""Shared by the benchmarks: run a command in a child process and measure that child alone."""

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
