"""How long ``aura --help`` takes to start, against ``python -c pass`` in the same run.

    .venv/bin/python bench/cli_startup.py [--aura PATH] [--runs N]

Runs each command N times (default 15), alternating, and prints the median wall time and
the median CPU time (user + system, which the machine's load moves less), and the ratio
of ``aura --help`` to a bare interpreter. Target: ``aura --help`` under 0.5 s of wall time
on an idle machine. ``--aura`` points at another install (``/work/main/.venv/bin/aura``)
to compare before and after.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _run(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of ``command`` (output discarded)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        command,
        check=False,
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env=os.environ | {"COLUMNS": "100"},
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(sys.executable).with_name("aura")
    parser.add_argument("--aura", default=str(default), help="The aura script to time.")
    parser.add_argument("--runs", type=int, default=15)
    options = parser.parse_args()
    python = str(Path(options.aura).with_name("python"))
    commands = {
        "python -c pass": [python, "-c", "pass"],
        "aura --help": [options.aura, "--help"],
        "aura dlq ls --help": [options.aura, "dlq", "ls", "--help"],
        "aura --version": [options.aura, "--version"],
    }
    for command in commands.values():  # warm the page cache and .pyc files
        subprocess.run(command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(options.runs):
        for name, command in commands.items():
            samples[name].append(_run(command))
    print(f"{options.aura}, {options.runs} runs each, median")
    medians = {}
    for name, runs in samples.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        medians[name] = (wall, cpu)
        print(f"  {name:<20} wall {wall:6.3f} s   cpu {cpu:6.3f} s")
    base_wall, base_cpu = medians["python -c pass"]
    help_wall, help_cpu = medians["aura --help"]
    print(
        f"ratio aura --help / python -c pass: wall {help_wall / base_wall:.1f}x, "
        f"cpu {help_cpu / base_cpu:.1f}x"
    )
    verdict = "MET" if help_wall < 0.5 else "NOT MET (see the cpu column if the machine is busy)"
    print(f"target aura --help < 0.5 s: {help_wall:.3f} s, {verdict}")


if __name__ == "__main__":
    main()
