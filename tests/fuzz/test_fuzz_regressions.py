"""Every input a fuzz target ever crashed on (tests/fuzz/regressions/TARGET/), and every seed (fuzz/seeds/TARGET/),
run through the same harness in-process: each must end in one of the target's documented outcomes, in time.
The seeds must also reach the code behind the parsers (served requests, written images, loaded profiles): a
harness that refused everything would fuzz nothing."""
import time
from pathlib import Path

import pytest

import targets

HERE = Path(__file__).resolve().parent
SEEDS = HERE.parents[1] / "fuzz" / "seeds"
REGRESSIONS = HERE / "regressions"
# an outcome that only a well-formed input reaches, per target
DEEP = {"virtqueue": "chains", "virtio_blk": "served", "virtio_net": "sent", "qcow2": "written", "profile": "loaded"}


def _inputs(folder: Path) -> list:
    return [pytest.param(t.name, f, id=f"{t.name}/{f.name}")
            for t in sorted(folder.iterdir()) if t.is_dir() for f in sorted(t.iterdir()) if f.is_file()]


def _run(target: str, path: Path) -> str:
    module = targets.load(target)
    start = time.monotonic()
    outcome = module.one_input(path.read_bytes())
    elapsed = time.monotonic() - start
    assert elapsed < module.TIMEOUT, f"{path.name} took {elapsed:.1f} s (the fuzzer's limit is {module.TIMEOUT} s)"
    assert isinstance(outcome, str)
    return outcome


@pytest.mark.parametrize("target, path", _inputs(REGRESSIONS))
def test_crash_found_by_fuzzing_stays_fixed(target, path):
    _run(target, path)


def test_every_target_has_seeds():
    assert sorted(p.name for p in SEEDS.iterdir() if p.is_dir()) == sorted(targets.TARGETS)


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_seeds_run_and_reach_deep_outcomes(target):
    outcomes = [_run(target, path) for path in sorted((SEEDS / target).iterdir())]
    assert DEEP[target] in outcomes, outcomes
