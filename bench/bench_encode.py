#!/usr/bin/env python3
"""Time to build one study's result objects (SR, heatmaps, presentation states, summary), in process.

    .venv/bin/python bench/bench_encode.py [REPO ...]

Each REPO (default: this checkout) is a checkout of the node; its own code builds the objects for the
same 4-image DX study (FracAtlas fixtures, the test suite's synthetic results), median of 5 builds.
Give two checkouts (e.g. a worktree of an older commit and this one) to compare them side by side;
each runs in its own process, alternately, twice.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHILD = r'''
import statistics, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.test_results_support import MODEL, dx_study, make_results
from dicom_node.results_dicom import build_result_objects
sources = dx_study(Path(tempfile.mkdtemp()), n=4, offset=0)
results = make_results(sources)
build_result_objects(sources, results, MODEL)
times = []
for _ in range(5):
    t = time.perf_counter()
    objs = build_result_objects(sources, results, MODEL)
    times.append(time.perf_counter() - t)
print(f"{sys.argv[1]}: {len(objs.datasets())} objects, median {statistics.median(times):.3f} s")
'''


def main() -> int:
    repos = [Path(p).resolve() for p in sys.argv[1:]] or [Path(__file__).resolve().parent.parent]
    for _ in range(2 if len(repos) > 1 else 1):
        for repo in repos:
            subprocess.run([sys.executable, "-c", CHILD, str(repo)], check=True, cwd=repo)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
