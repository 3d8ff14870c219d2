"""Start-up time of the CLI: wall clock of `python -m vitkit ARGS` in a fresh process, median of N runs.

python scripts/startup_time.py            # --help and models, 5 runs each, alternating
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {"vitkit --help": ["--help"], "vitkit models": ["models"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {k: [] for k in CASES}
    for _ in range(args.runs):
        for label, argv in CASES.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "vitkit", *argv], check=True, stdout=subprocess.DEVNULL)
            times[label].append(time.perf_counter() - start)
    for label, values in times.items():
        print(f"{label:<14} median {statistics.median(values):.2f} s  (runs: {', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
