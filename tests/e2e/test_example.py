"""examples/minimal.py, the core path in one page, as its docstring runs it: real
horovodrun with 2 processes on real shards."""
import math
import os
import re
import sys

from tests.conftest import ROOT
from tests.e2e.harness import HOROVODRUN, run

EXAMPLE = os.path.join(ROOT, "examples", "minimal.py")


def test_minimal_example_two_ranks_learns_and_ends_with_equal_parameters(synth_data):
    r = run(HOROVODRUN + [sys.executable, EXAMPLE, "--data", f"{synth_data}/train", "--steps", "30"], timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    done = re.findall(r"rank (\d): done, loss ([\d.]+) -> ([\d.]+) \(means of the first and last 5 steps\), "
                      r"parameters sha256 ([0-9a-f]{16})", r.stdout)
    assert sorted(d[0] for d in done) == ["0", "1"], r.stdout[-3000:]
    assert done[0][1:] == done[1][1:]  # the same losses (means over ranks) and the same weights on both ranks
    first, last = float(done[0][1]), float(done[0][2])
    assert abs(first - math.log(10)) < 0.3  # an untrained 10-class classifier starts near ln 10
    assert last < first - 0.5, (first, last)  # and learns the synthetic classes
    assert "step   30  loss" in r.stdout and "(64 images per step, 2 ranks)" in r.stdout


def test_minimal_example_fits_on_one_page():
    lines = open(EXAMPLE).read().splitlines()
    assert len(lines) <= 150 and max(map(len, lines)) <= 120
