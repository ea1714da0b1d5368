"""CI's short fuzzing run: every target under atheris for a few seconds from its seeds (fuzz/run), about 50 s in
all. A crash, a hang or a memory blow-up fails the test and leaves the input in the test's crashes/ folder (the
message names it); the long runs are fuzz/README.md's business. The last two tests show that this run does fail
when a harness finds something."""
import importlib.util
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

import targets

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "fuzz" / "run"
SECONDS = 5                 # per target; with start-up and the seeds about 9 s each
MISBEHAVING = Path(__file__).resolve().parent / "misbehaving_harness.py"


@pytest.fixture(autouse=True, scope="module")
def atheris_installed():
    if importlib.util.find_spec("atheris") is None:
        if platform.machine() == "x86_64":   # scripts/install-deps --test installs it (pyproject's test extra)
            pytest.fail("atheris is not installed: run scripts/install-deps --test (pip install atheris)")
        pytest.skip(f"atheris publishes no wheel for {platform.machine()}")


def fuzz(target: str, work: Path, *args: str) -> tuple[int, dict, str]:
    """fuzz/run's exit status, its FUZZ summary as a dict, and its whole output."""
    proc = subprocess.run([sys.executable, str(RUN), target, "--work", str(work), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    out = proc.stdout + proc.stderr
    line = next((l for l in proc.stdout.splitlines() if l.startswith("FUZZ ")), "")
    return proc.returncode, dict(re.findall(r"(\w+)=(\S+)", line)), out


@pytest.mark.parametrize("target", list(targets.TARGETS))
def test_target_finds_nothing_in_a_short_run(target, tmp_path):
    rc, summary, out = fuzz(target, tmp_path, "--seconds", str(SECONDS))
    crashes = sorted(p.name for p in (tmp_path / "crashes" / target).iterdir())
    assert rc == 0 and summary.get("status") == "ok" and not crashes, \
        f"fuzz/run {target} found something: {crashes} in {tmp_path / 'crashes' / target}\n{out[-3000:]}"
    seeds = len(os.listdir(ROOT / "fuzz" / "seeds" / target))
    assert int(summary["runs"]) >= seeds, summary            # every seed ran, then the fuzzer went on
    assert int(summary["cov"]) > 0 and int(summary["ft"]) > 0, summary   # coverage was measured


def test_a_crashing_input_fails_the_run(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "planted").write_bytes(b"CRASH")
    rc, summary, out = fuzz(str(MISBEHAVING), tmp_path, "--seconds", "5", "--corpus", str(corpus))
    assert rc == 1 and summary["status"] == "crash", out
    saved = list((tmp_path / "crashes" / "misbehaving_harness").glob("crash-*"))
    assert [p.read_bytes() for p in saved] == [b"CRASH"], out


def test_a_hanging_input_fails_the_run(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "planted").write_bytes(b"HANG")
    rc, summary, out = fuzz(str(MISBEHAVING), tmp_path, "--seconds", "5", "--timeout", "1", "--corpus", str(corpus))
    assert rc == 1 and summary["status"] == "crash", out
    saved = list((tmp_path / "crashes" / "misbehaving_harness").glob("timeout-*"))
    assert [p.read_bytes() for p in saved] == [b"HANG"], out
