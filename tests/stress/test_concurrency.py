"""A short concurrency run in CI (scripts/concurrency-run does the long one): 4 VMs, two racing `up`s each, started
and stopped in parallel for 2 rounds, nothing left behind."""
import sys
from pathlib import Path

import pytest

from cloudkvm.kvm.system import kvm_available

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
import concurrency  # noqa: E402

pytestmark = pytest.mark.skipif(not kvm_available()[0], reason=f"/dev/kvm unavailable: {kvm_available()[1]}")


def test_parallel_starts_and_stops_leave_nothing_behind(tmp_path):
    figures = concurrency.run(tmp_path, vms=4, rounds=2, progress=lambda line: None)
    assert figures.problems == []
    assert figures.rounds == 2 and figures.vms_started == 8 and figures.race_losers_ok == 8
