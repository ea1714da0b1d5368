"""Validate-time checks (cloudkvm/preflight.py): what `up` would only find out in the background is refused at
`validate` (and at `up`, before anything exists) in one line naming the profile's file:line:col.

Two kinds of test: the rules on made-up hosts (HostFacts given; every expected number derived here by hand), and
agreement with the real thing on this host: the kernel's mmap for guest RAM (kvm/memory.GuestMemory), its
ftruncate for a raw disk, the board's virtio-mmio slots and the log opener `up` uses.
"""
import mmap
import os
import resource
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cloudkvm import cli
from cloudkvm.boards.x86 import board as x86
from cloudkvm.boards.x86.cpu import CpuPolicy
from cloudkvm.errors import CloudkvmError
from cloudkvm.hostquirks import HostQuirks
from cloudkvm.preflight import HostFacts, check_profile, host_facts, virtio_device_count
from cloudkvm.profile import load_profile

GiB, TiB = 1 << 30, 1 << 40
ROOT = Path(__file__).resolve().parents[1]
PREFLIGHT = ROOT / "tests" / "profiles" / "broken" / "preflight"
ROOMY = HostFacts(mem_total=64 * GiB, swap_total=0, commit_limit=40 * GiB, committed=GiB, overcommit=1,
                  address_space_limit=None, address_space_used=100 << 20, phys_bits=46, kvm_max_vcpus=1024,
                  file_size_limit=None)
# Python's mmap module has MAP_NORESERVE from 3.12 on; without it (3.11) guest RAM is charged to overcommit.
CHARGED = not hasattr(mmap, "MAP_NORESERVE")


@pytest.fixture
def profile(tmp_path):
    """profile("cpus: 4\\n...") -> a loaded profile (name and kernel given), written at tmp_path/p.yaml."""
    (tmp_path / "vmlinuz").write_text("kernel")

    def load(extra: str = ""):
        (tmp_path / "p.yaml").write_text("name: t\nboot:\n  kernel: vmlinuz\n" + extra)
        return load_profile(tmp_path / "p.yaml")
    return load


def this_tree_env() -> dict:
    """The environment for a child Python that imports this tree's cloudkvm from any folder."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def refused(loaded, host=ROOMY) -> CloudkvmError:
    with pytest.raises(CloudkvmError) as info:
        check_profile(loaded, host)
    assert "\n" not in str(info.value) and info.value.hint
    return info.value


# ---------------------------------------------------------------------------------------------------- memory

@pytest.mark.skipif(not CHARGED, reason="Python maps guest RAM with MAP_NORESERVE here: overcommit 0 charges none")
def test_heuristic_overcommit_refuses_a_region_larger_than_ram_and_swap(profile):
    """x86: RAM is [0, 3G) and [4G, ...); overcommit 0 refuses one mmap larger than RAM + swap (8G + 2G here);
    each region's mapping is 2 MiB larger than the region (kvm/memory.py aligns it for huge pages)."""
    host = replace(ROOMY, mem_total=8 * GiB, swap_total=2 * GiB, overcommit=0)
    check_profile(profile("memory: 13310M\n"), host)  # 3G + (10G - 2M), mapped as 10G
    err = refused(profile("memory: 13311M\n"), host)  # 3G + (10G - 1M), mapped as 10G + 1M
    assert "p.yaml:4:9: memory: 13311M of guest RAM cannot be mapped" in err.message, err.message
    assert "vm.overcommit_memory = 0" in err.message and err.hint == "give the VM at most 12G here"


def test_always_overcommit_maps_up_to_one_kvm_memory_slot(profile):
    """A KVM memory slot holds 2^31 - 1 pages (include/linux/kvm_host.h): 8T - 4K above 4 GiB."""
    check_profile(profile("memory: 8391679M\n"), ROOMY)  # 3G + 8T - 1M
    err = refused(profile("memory: 8391680M\n"))  # 3G + 8T
    assert "p.yaml:4:9: memory:" in err.message and "one KVM memory slot" in err.message


def test_guest_ram_must_end_below_the_physical_address_width(profile):
    host = replace(ROOMY, phys_bits=36)  # 64 GiB of physical addresses
    check_profile(profile("memory: 63G\n"), host)  # RAM ends at 4G + 60G = 64G
    err = refused(profile("memory: 64513M\n"), host)
    assert "36-bit physical addresses" in err.message and err.hint == "give the VM at most 63G here"


def test_strict_overcommit_refuses_more_than_the_commit_left(profile):
    """Strict accounting charges every region's whole mapping: RAM [0, 3G) and [4G, ...), 2 MiB more each."""
    host = replace(ROOMY, overcommit=2, commit_limit=10 * GiB, committed=2 * GiB)
    check_profile(profile("memory: 8188M\n"), host)  # two regions: 8188M + 2 x 2M = 8G
    err = refused(profile("memory: 8189M\n"), host)
    assert "CommitLimit - Committed_AS" in err.message and "only 8G can still be committed" in err.message


def test_the_address_space_limit_counts_what_the_vmm_already_maps(profile):
    host = replace(ROOMY, address_space_limit=4 * GiB, address_space_used=GiB)
    check_profile(profile("memory: 3070M\n"), host)  # one region, mapped with 2M more: 3G with the VMM's 1G
    err = refused(profile("memory: 3071M\n"), host)
    assert "ulimit -v: 4G" in err.message and err.hint == "give the VM at most 2G here"


def _ram_plus_swap() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(fields[name].split()[0]) * 1024 for name in ("MemTotal", "SwapTotal"))


@pytest.mark.parametrize("offset_gib", [-1, 1, 40])
def test_validate_agrees_with_the_kernel_about_mapping_guest_ram(profile, offset_gib):
    """Guest RAM around (RAM + swap) above the 3 GiB below the MMIO gap: the real mapping (kvm/memory.py, never
    touched, so nothing is used) decides, and validate must say the same."""
    from cloudkvm.kvm.memory import GuestMemory

    memory = (3 + _ram_plus_swap() // GiB + offset_gib) * GiB
    loaded = profile(f"memory: {memory >> 20}M\n")
    try:
        GuestMemory(x86.memory_layout(memory)).close()
        maps = True
    except OSError:
        maps = False
    try:
        check_profile(loaded)
        accepted = True
    except CloudkvmError as exc:
        assert "memory:" in exc.message
        accepted = False
    assert accepted == maps, f"memory {memory >> 30}G: mmap {'works' if maps else 'fails'}, validate disagrees"


_MAP_IN_CHILD = ("import sys\nfrom cloudkvm.boards.x86.board import memory_layout\n"
                 "from cloudkvm.kvm.memory import GuestMemory\ntry:\n"
                 "    GuestMemory(memory_layout(int(sys.argv[1]))).close()\nexcept OSError:\n    sys.exit(3)\n")


def test_validate_refuses_memory_beyond_ulimit_v_as_the_mapping_would(tmp_path):
    (tmp_path / "vmlinuz").write_text("kernel")
    (tmp_path / "p.yaml").write_text("name: t\nmemory: 3G\nboot:\n  kernel: vmlinuz\n")

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (2 * GiB, 2 * GiB))

    mapped = subprocess.run([sys.executable, "-c", _MAP_IN_CHILD, str(3 * GiB)], preexec_fn=limited, timeout=60,
                          env=this_tree_env())
    assert mapped.returncode == 3, "under ulimit -v 2G, 3G of guest RAM cannot be mapped"
    proc = subprocess.run([sys.executable, "-m", "cloudkvm", "validate", "p.yaml"], cwd=tmp_path, text=True,
                          capture_output=True, preexec_fn=limited, timeout=60,
                          env=this_tree_env())
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "p.yaml:2:9: memory: 3G of guest RAM cannot be mapped" in lines[0] and "ulimit -v: 2G" in lines[0]


# ---------------------------------------------------------------------------------------------------- vCPUs

def test_a_flat_guest_takes_as_many_vcpus_as_stacks_fit_above_the_page_tables(profile):
    """x86 flat ABI: vCPU n starts with RSP = 0x80000 - n * 4K; the page tables (PML4, PDPT, 4 PDs) end at
    0x9000 + 6 * 4K = 0xF000, so (0x80000 - 0xF000) / 4K = 113 stacks fit."""
    flat = "  format: flat\ncpus: {}\n"
    check_profile(profile(flat.format(113)), ROOMY)
    err = refused(profile(flat.format(114)))
    assert "p.yaml:5:7: cpus: a flat guest on the x86 board takes at most 113 vCPUs" in err.message, err.message
    check_profile(profile("cpus: 200\n"), ROOMY)  # a Linux guest starts its other vCPUs itself


def test_no_more_vcpus_than_kvm_takes(profile):
    host = replace(ROOMY, kvm_max_vcpus=64)
    check_profile(profile("cpus: 64\n"), host)
    err = refused(profile("cpus: 65\n"), host)
    assert "p.yaml:4:7: cpus: this host's KVM takes at most 64 vCPUs" in err.message
    check_profile(profile("cpus: 65\n"), replace(host, kvm_max_vcpus=None))  # no /dev/kvm: `up` says so itself


# ---------------------------------------------------------------------------------------------------- virtio

def _disks(count: int, tmp_path: Path) -> str:
    (tmp_path / "d.raw").write_bytes(bytes(4096))
    return "disks:\n" + "  - {file: d.raw, format: raw, read_only: true}\n" * count


@pytest.mark.parametrize("disks,network,fits", [(16, "none", True), (15, "user", True), (16, "user", False),
                                                (17, "none", False)])
def test_virtio_devices_must_fit_the_boards_slots(profile, tmp_path, disks, network, fits):
    """17 virtio-mmio slots on x86 (GSIs 5-7 and 10-23, docs/architecture.md): disks + network + rng."""
    loaded = profile(f"network: {network}\n" + _disks(disks, tmp_path))
    board = x86.X86Board(1, CpuPolicy(), HostQuirks())
    count = virtio_device_count(loaded)
    assert count == disks + (network == "user") + 1
    if fits:
        check_profile(loaded, ROOMY)
        board.virtio_slot(count - 1)  # the board really has the last slot
        return
    err = refused(loaded)
    most = 17 - 1 - (network == "user")
    assert f"p.yaml:{6 + most}:5: disks[{most}]: the x86 board has 17 virtio-mmio slots" in err.message, err.message
    with pytest.raises(CloudkvmError):
        board.virtio_slot(count - 1)  # and really has no slot for the last device


# ---------------------------------------------------------------------------------------------------- console.log

def _console_cases(tmp_path: Path) -> dict:
    (tmp_path / "existing.log").write_text("old\n")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link.log").symlink_to(tmp_path / "existing.log")
    (tmp_path / "plain").write_text("x")
    return {"new.log": None, "existing.log": None, "missing/console.log": "the folder", "folder": "is a folder",
            "fifo": "is a FIFO", "link.log": "is a symlink", "plain/console.log": "is not a folder"}


def test_console_log_agrees_with_the_log_opener(profile, tmp_path):
    """Each console.log a profile can name: validate accepts exactly what `up`'s log opener can open, and never
    opens (or creates) anything itself."""
    from cloudkvm.logfile import open_log

    for name, refusal in _console_cases(tmp_path).items():
        loaded = profile(f"console:\n  log: {name}\n")
        before = sorted(p.name for p in tmp_path.iterdir())
        if refusal is None:
            check_profile(loaded, ROOMY)
        else:
            err = refused(loaded)
            assert "p.yaml:5:8: console.log: " in err.message and refusal in err.message, (name, err.message)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, "validate created nothing"
        try:
            os.close(open_log(tmp_path / name))
            opens = True
        except CloudkvmError:
            opens = False
        assert opens == (refusal is None), name


# ---------------------------------------------------------------------------------------------------- raw size

@pytest.mark.parametrize("size", ["1G", "17T", "4194304T", "8388607T"])
def test_raw_size_agrees_with_ftruncate_on_this_file_system(profile, tmp_path, size):
    """Whether the file system can hold a raw image of `size` (ext4 with 4K blocks: 16T - 4K; tmpfs/xfs: 8E - 1):
    ftruncate on a scratch file beside it decides, and validate must say the same (without writing)."""
    from cloudkvm.units import parse_size

    (tmp_path / "d.raw").write_bytes(bytes(4096))
    scratch = tmp_path / "scratch"
    scratch.write_bytes(b"")
    try:
        os.truncate(scratch, parse_size(size))
        fits = True
    except (OSError, OverflowError):
        fits = False
    finally:
        scratch.unlink()
    loaded = profile(f"disks:\n  - file: d.raw\n    format: raw\n    size: {size}\n")
    if fits:
        check_profile(loaded, host_facts())
    else:
        err = refused(loaded, host_facts())
        assert "p.yaml:7:11: disks[0].size: the raw image" in err.message, err.message
    assert (tmp_path / "d.raw").stat().st_size == 4096, "validate grows nothing"


def test_raw_size_respects_ulimit_f(profile, tmp_path):
    (tmp_path / "d.raw").write_bytes(bytes(4096))
    host = replace(ROOMY, file_size_limit=GiB)
    check_profile(profile("disks:\n  - {file: d.raw, format: raw, size: 1G}\n"), host)
    err = refused(profile("disks:\n  - {file: d.raw, format: raw, size: 1025M}\n"), host)
    assert "disks[0].size" in err.message and "ulimit -f" in err.message
    # an overlay grows a qcow2 in the instance folder, never the raw file
    check_profile(profile("disks:\n  - {file: d.raw, format: raw, size: 1025M, overlay: true}\n"), host)


def test_raw_size_beyond_ulimit_f_through_validate(tmp_path):
    (tmp_path / "vmlinuz").write_text("kernel")
    (tmp_path / "d.raw").write_bytes(bytes(4096))
    (tmp_path / "p.yaml").write_text("name: t\nboot:\n  kernel: vmlinuz\ndisks:\n  - {file: d.raw, size: 2M}\n")

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    grow = "import os, sys\ntry:\n    os.truncate(sys.argv[1], 2 << 20)\nexcept OSError:\n    sys.exit(3)\n"
    (tmp_path / "scratch").write_bytes(b"")
    truth = subprocess.run([sys.executable, "-c", grow, str(tmp_path / "scratch")], preexec_fn=limited, timeout=60,
                          env=this_tree_env())
    assert truth.returncode == 3, "under ulimit -f 1M, a file cannot grow to 2M"
    proc = subprocess.run([sys.executable, "-m", "cloudkvm", "validate", "p.yaml"], cwd=tmp_path, text=True,
                          capture_output=True, preexec_fn=limited, timeout=60,
                          env=this_tree_env())
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "p.yaml:5:25: disks[0].size: the raw image" in lines[0] and "ulimit -f" in lines[0]


# ---------------------------------------------------------------------------------------------------- the CLI

FIXTURES = {
    "p01-memory-beyond-a-kvm-slot.yaml": ("p01-memory-beyond-a-kvm-slot.yaml:5:9:", "memory: 64T of guest RAM"),
    "p02-more-virtio-devices-than-slots.yaml": ("p02-more-virtio-devices-than-slots.yaml:22:5:",
                                                "disks[15]: the x86 board has 17 virtio-mmio slots"),
    "p03-flat-guest-too-many-cpus.yaml": ("p03-flat-guest-too-many-cpus.yaml:3:7:", "cpus: a flat guest"),
    "p04-console-log-in-a-missing-folder.yaml": ("p04-console-log-in-a-missing-folder.yaml:5:8:",
                                                 "console.log: the folder"),
    "p05-console-log-is-a-folder.yaml": ("p05-console-log-is-a-folder.yaml:5:8:", "console.log: "),
    "p06-raw-size-beyond-any-file-system.yaml": ("p06-raw-size-beyond-any-file-system.yaml:8:11:",
                                                 "disks[0].size: the raw image"),
}


def test_every_preflight_fixture_has_an_expectation():
    assert sorted(FIXTURES) == sorted(p.name for p in PREFLIGHT.glob("*.yaml"))


@pytest.mark.parametrize("argv", [["validate"], ["up"], ["up", "--foreground"]], ids=["validate", "up", "up-fg"])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_cli_refuses_in_one_line_and_creates_nothing(name, argv, tmp_path, monkeypatch, capsys):
    state = tmp_path / "state"
    monkeypatch.setenv("CLOUDKVM_STATE_DIR", str(state))
    monkeypatch.setattr(sys, "argv", ["cloudkvm", *argv, str(PREFLIGHT / name)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    where, what = FIXTURES[name]
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert where in lines[0] and what in lines[0], lines[0]
    assert not state.exists() or not any(state.iterdir())
    assert not (PREFLIGHT / "no-such-folder").exists()
    assert (PREFLIGHT / "_files" / "disk.raw").stat().st_size == 4096
