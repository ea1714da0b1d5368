"""Crash safety, a CI-sized run (scripts/crashrun does 100 rounds of each kind): a writer is SIGKILLed at a
random moment mid-storm, directly on the qcow2 backend and as the VMM of a VM whose guest storms its virtio-blk
disk. `qemu-img check` must find no corruption (leaked clusters are allowed), every write an acknowledged flush
covered must read back, and cloudkvm must reopen the image and write on (crashrun.py says exactly how)."""
import random

import pytest

import crashrun

pytestmark = pytest.mark.skipif(crashrun.tools_missing() is not None, reason=str(crashrun.tools_missing()))


def _assert_sound(rounds) -> None:
    bad = [r.line() for r in rounds if not r.ok]
    assert not bad, "\n".join(bad)
    assert any(r.ops_flushed for r in rounds), "no flush was acknowledged before any kill: the test proves nothing"


@pytest.mark.parametrize("cluster_size,backing,delays", [
    (512, False, (0.15, 0.6)),      # tiny clusters: refcount blocks and table moves under the knife
    (4096, True, (0.05, 0.4)),      # copy-on-write from a backing file
    (65536, False, (0.3, 0.9)),
])
def test_sigkill_during_a_backend_write_storm(tmp_path, cluster_size, backing, delays):
    rounds = []
    for run, delay in enumerate(delays):
        rng = random.Random(run * 1000 + cluster_size)
        rounds.append(crashrun.backend_round(tmp_path, cluster_size, backing, rng.randrange(1 << 30),
                                             delay * (0.75 + rng.random() / 2), min_flushes=run))
    _assert_sound(rounds)


@pytest.mark.kvm
def test_sigkill_of_the_vmm_during_a_guest_write_storm(tmp_path):
    guest = crashrun.crash_guest()
    plan = [(512, True, 11, 0.9, 2), (4096, False, 22, 0.3, 0), (65536, False, 33, 1.4, 4)]
    rounds = [crashrun.vm_round(tmp_path, cluster_size, backing, seed, delay, guest, min_flushes=min_flushes)
              for cluster_size, backing, seed, delay, min_flushes in plan]
    _assert_sound(rounds)


@pytest.mark.parametrize("kind", ["backend", pytest.param("vm", marks=pytest.mark.kvm)])
def test_a_flush_that_does_not_persist_is_caught(tmp_path, monkeypatch, kind):
    """The checks can fail: with flush() doing nothing in the killed writer (CRASHRUN_SABOTAGE), acknowledged
    writes whose metadata never reached the file must be reported lost."""
    monkeypatch.setenv("CRASHRUN_SABOTAGE", "no-flush")
    if kind == "vm":
        r = crashrun.vm_round(tmp_path, 65536, False, 44, 0.5, min_flushes=10)
    else:
        r = crashrun.backend_round(tmp_path, 65536, False, 55, 0.3, min_flushes=10)
    assert r.ops_flushed > 0, r.line()
    assert r.lost_sectors > 0, r.line()
