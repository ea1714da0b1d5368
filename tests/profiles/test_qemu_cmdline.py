"""QEMU command lines <-> profiles: the seed's command line imports as profiles/vm2.yaml, profiles print as
QEMU command lines that import back to the same meaning, and nothing unmapped is dropped silently."""
import shlex

import pytest
import yaml

from cloudkvm.profile import GiB, MiB, load_profile, validate_profile
from cloudkvm.qemu_cmdline import (dump_profile_yaml, import_qemu, parse_qemu_opts, profile_to_qemu,
                                   split_qemu_command)
from profile_testdata import PROFILES, SEED_COMMAND

SEED_ARGV = ["qemu-system-aarch64", "-name", "vm2", "-daemonize", "-enable-kvm", "-M", "virt", "-cpu", "host",
             "-smp", "2", "-m", "4096", "-global", "virtio-blk-device.scsi=off", "-device",
             "virtio-scsi-device,id=scsi", "-kernel", "vmlinuz-4.18", "--append",
             "console=ttyAMA0 root=UUID=6a09973e-e8fd-4a6d-a8c0-1deb9556f477", "-initrd", "initramfs-4.18",
             "-drive", "file=vhuser-test1.qcow2", "-netdev", "user,id=unet,hostfwd=tcp:127.0.0.1:1122-:22",
             "-device", "virtio-net-device,netdev=unet", "-vnc", ":10"]


def meaning(data: dict, base_dir=PROFILES):
    return validate_profile(data, base_dir, env={}, check_files=False).model_dump()


def vm2():
    return load_profile(PROFILES / "vm2.yaml", env={}, check_files=False)


def test_split_rejoins_the_append_value_that_ps_unquoted():
    assert split_qemu_command(SEED_COMMAND) == SEED_ARGV
    assert split_qemu_command("qemu-system-x86_64 -append 'a b' -m 1G") == ["qemu-system-x86_64", "-append", "a b",
                                                                           "-m", "1G"]


@pytest.mark.parametrize("argv", [split_qemu_command(SEED_COMMAND), SEED_ARGV])
def test_the_seed_command_line_means_profiles_vm2(argv):
    data, unmapped = import_qemu(argv)
    assert meaning(data) == vm2().model_dump()
    assert unmapped == [
        "-device virtio-scsi-device,id=scsi (SCSI controllers are not supported: disks are virtio-blk)",
        "-vnc :10 (no graphical display: cloudkvm gives the guest a serial console only)",
    ]  # -global virtio-blk-device.scsi=off is cloudkvm's behaviour already: mapped, not listed


def test_the_seed_import_as_yaml():
    data, _ = import_qemu(SEED_ARGV)
    text = dump_profile_yaml(data, schema="./schema.json")
    assert text.splitlines()[0] == "# yaml-language-server: $schema=./schema.json"
    assert yaml.safe_load(text) == data
    keys = [line.split(":")[0] for line in text.splitlines()[1:] if line and not line.startswith((" ", "-"))]
    assert keys == ["name", "arch", "machine", "cpu", "cpus", "memory", "boot", "disks", "network", "daemonize"]
    assert "memory: 4G\n" in text and "- tcp:127.0.0.1:1122-:22\n" in text


def test_vm2_round_trip():
    profile = vm2()
    argv = profile_to_qemu(profile)
    assert argv[:3] == ["qemu-system-aarch64", "-name", "vm2"]
    data, unmapped = import_qemu(argv)
    assert unmapped == []
    assert validate_profile(data, "/", env={}, check_files=False) == profile


def test_round_trip_of_every_other_field(tree):
    folder = tree({"p.yaml": """
        name: every-field
        arch: x86_64
        cpu: {hide: [cx16, sse3, sse4_1, tsc_deadline]}
        cpus: 3
        memory: 1536M
        boot: {kernel: vmlinuz, initrd: initrd.img, cmdline: "console=ttyS0 a='b c'"}
        disks:
          - {file: a.qcow2, format: qcow2, read_only: true}
          - {file: 'b,c.raw', format: raw}
        network:
          mode: user
          net: 192.168.5.0/24
          restrict: true
          forwards: [tcp:127.0.0.1:2222-:22, udp:0.0.0.0:5353-192.168.5.15:53]
        console: {log: serial.log}
        daemonize: false
        host_quirks: true
        """})
    profile = load_profile(folder / "p.yaml", env={}, check_files=False)
    argv = profile_to_qemu(profile)
    assert "-M" in argv and argv[argv.index("-M") + 1] == "microvm"
    assert argv[argv.index("-cpu") + 1] == "host,cx16=off,pni=off,sse4.1=off,tsc-deadline=off"
    assert f"file={folder}/b,,c.raw,format=raw,if=none,id=disk1" in argv
    data, unmapped = import_qemu(shlex.split(shlex.join(argv)))
    assert unmapped == []
    assert validate_profile(data, "/", env={}, check_files=False) == profile


def test_overlay_and_network_none_round_trip_with_a_note(tree):
    folder = tree({"p.yaml": "name: o\narch: x86_64\nboot: {kernel: k}\ndisks: [{file: d.qcow2, overlay: true}]\n"})
    profile = load_profile(folder / "p.yaml", env={}, check_files=False)
    argv = profile_to_qemu(profile)
    assert argv[argv.index("-nic") + 1] == "none"
    data, unmapped = import_qemu(argv)
    assert len(unmapped) == 1 and "snapshot=on" in unmapped[0] and "approximated" in unmapped[0]
    assert validate_profile(data, "/", env={}, check_files=False) == profile


def test_options_in_their_other_forms():
    data, unmapped = import_qemu([
        "/usr/bin/qemu-system-x86_64", "-name", "guest=web,debug-threads=on", "-machine", "microvm,accel=kvm",
        "-cpu", "host,-cx16,avx512f=off", "-smp", "cpus=4,cores=4,threads=1,sockets=1", "-m", "size=2G",
        "-kernel", "bzImage", "-append", "console=ttyS0",
        "-drive", "file=root.img,format=raw,if=none,id=root,readonly=on",
        "-device", "virtio-blk-pci,drive=root", "-drive", "if=virtio,file=data.qcow2,format=qcow2",
        "-netdev", "user,id=n0,hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:5353-10.0.2.15:53,restrict=on",
        "-device", "virtio-net-pci,netdev=n0", "-nographic", "-serial", "file:console.log"])
    assert data == {
        "name": "web", "arch": "x86_64", "machine": "x86", "cpu": {"model": "host", "hide": ["cx16", "avx512f"]},
        "cpus": 4, "memory": "2G", "boot": {"kernel": "bzImage", "cmdline": "console=ttyS0"},
        "disks": [{"file": "root.img", "format": "raw", "read_only": True},
                  {"file": "data.qcow2", "format": "qcow2"}],
        "network": {"mode": "user", "restrict": True,
                    "forwards": ["tcp:0.0.0.0:2222-:22", "udp:127.0.0.1:5353-10.0.2.15:53"]},
        "console": {"log": "console.log"}, "daemonize": False}
    assert unmapped == ["-name debug-threads=on (not a profile setting)"]


@pytest.mark.parametrize("smp, cpus", [("2", 2), ("cpus=3", 3), ("sockets=1,cores=4", 4), ("8,maxcpus=8", 8)])
def test_smp_forms(smp, cpus):
    assert import_qemu(["qemu-system-x86_64", "-smp", smp])[0]["cpus"] == cpus


@pytest.mark.parametrize("m, memory", [("4096", "4G"), ("4G", "4G"), ("512M", "512M"), ("size=1G", "1G"),
                                       ("1536", "1536M"), ("2g", "2G")])
def test_memory_forms(m, memory):
    data, _ = import_qemu(["qemu-system-x86_64", "-m", m])
    assert data["memory"] == memory


def test_defaults_that_qemu_would_apply_are_written_out():
    data, unmapped = import_qemu(["qemu-system-x86_64", "-kernel", "k"])
    assert (data["cpus"], data["memory"], data["network"], data["daemonize"]) == (1, "128M", "user", False)
    assert {note.split(" (")[0] for note in unmapped} == {"(no -M)", "(no -enable-kvm)", "(no -cpu)", "(no -name)"}
    assert meaning(data)["memory"] == 128 * MiB


@pytest.mark.parametrize("args, network", [
    (["-nodefaults"], "none"), (["-nic", "none"], "none"), (["-net", "none"], "none"),
    (["-nic", "user,model=virtio-net-pci"], "user"),
    (["-net", "nic,model=virtio", "-net", "user,hostfwd=tcp::80-:80"], {"mode": "user",
                                                                       "forwards": ["tcp:0.0.0.0:80-:80"]}),
])
def test_network_forms(args, network):
    data, _ = import_qemu(["qemu-system-aarch64", "-M", "virt", "-enable-kvm", "-cpu", "host", "-name", "n", *args])
    assert data["network"] == network


def test_nothing_is_dropped_silently():
    data, unmapped = import_qemu([
        "qemu-system-aarch64", "-name", "x", "-enable-kvm", "-M", "virt,gic-version=3", "-cpu", "cortex-a57",
        "-smp", "4,sockets=2", "-m", "1G,slots=2,maxmem=4G", "-kernel", "Image", "-bios", "QEMU_EFI.fd",
        "-drive", "file=a.vmdk,format=vmdk", "-drive", "file=b.qcow2,if=none,id=b", "-drive",
        "file=seed.iso,media=cdrom", "-drive", "file=c.qcow2,cache=none,aio=native",
        "-netdev", "tap,id=t0", "-device", "virtio-net-device,netdev=t0", "-netdev", "user,id=u1",
        "-device", "virtio-rng-pci", "-monitor", "stdio", "-serial", "pty", "-global", "kvm-pit.lost_tick_policy=delay",
        "-display", "gtk", "-object", "rng-random,id=rng0", "-pidfile", "x.pid", "-snapshot", "-S", "stray.img"])
    texts = "\n".join(unmapped)
    for fragment in ["-M gic-version=3", "-cpu cortex-a57", "-smp 4,sockets=2", "-m slots=2", "-m maxmem=4G",
                     "-bios QEMU_EFI.fd", "file=a.vmdk,format=vmdk", "file=b.qcow2,if=none,id=b",
                     "file=seed.iso,media=cdrom", "-drive cache=none,aio=native", "-netdev tap,id=t0",
                     "-netdev user,id=u1", "-device virtio-rng-pci", "-monitor stdio", "-serial pty",
                     "-global kvm-pit.lost_tick_policy=delay", "-display gtk", "-object rng-random,id=rng0",
                     "-pidfile x.pid", "-S (not supported", "stray.img (approximated: snapshot=on (or -snapshot)"]:
        assert fragment in texts, fragment
    assert [d["file"] for d in data["disks"]] == ["c.qcow2", "stray.img"]
    assert data["network"] == "none" and data["cpu"] == "host"


def test_a_nic_without_a_backend_is_listed():
    data, unmapped = import_qemu(["qemu-system-aarch64", "-net", "nic,model=virtio"])
    assert data["network"] == "none"
    assert any(note.startswith("-net nic (no -net user backend") for note in unmapped)


def test_unknown_options_keep_their_argument_and_binary_sets_arch():
    data, unmapped = import_qemu(["qemu-system-riscv64", "-frobnicate", "7", "-name", "r"])
    assert "arch" not in data
    assert unmapped[0].startswith("qemu-system-riscv64 (architecture riscv64 is not supported")
    assert "-frobnicate 7 (not supported by cloudkvm)" in unmapped
    assert import_qemu(["qemu-system-x86_64"])[0]["arch"] == "x86_64"
    assert import_qemu(["qemu-system-aarch64"])[0]["machine"] == "virt"


def test_mismatched_machine_is_listed():
    data, unmapped = import_qemu(["qemu-system-x86_64", "-M", "virt"])
    assert data["machine"] == "x86" and "-M virt (virt is an aarch64 machine, not x86_64)" in unmapped


def test_relative_paths_made_absolute_with_cwd(tmp_path):
    data, _ = import_qemu(["qemu-system-x86_64", "-kernel", "k", "-drive", "file=../d.raw,if=virtio"], cwd=tmp_path)
    assert data["boot"]["kernel"] == str(tmp_path / "k")
    assert data["disks"][0]["file"] == str(tmp_path.parent / "d.raw")


def test_import_result_is_a_valid_profile_for_vm2_paths():
    data, _ = import_qemu(SEED_ARGV)
    assert meaning(data)["memory"] == 4 * GiB


def test_parse_qemu_opts():
    assert parse_qemu_opts("virt,gic-version=3", "type") == [("type", "virt"), ("gic-version", "3")]
    assert parse_qemu_opts("file=a,,b.img,readonly", "file") == [("file", "a,b.img"), ("readonly", "on")]


def test_dump_orders_nested_keys():
    text = dump_profile_yaml({"daemonize": True, "boot": {"cmdline": "c", "kernel": "k"}, "name": "n",
                              "disks": [{"read_only": True, "file": "f"}], "zzz": 1, "base": "b.yaml"})
    assert text == ("base: b.yaml\nname: n\nboot:\n  kernel: k\n  cmdline: c\ndisks:\n- file: f\n  read_only: true\n"
                    "daemonize: true\nzzz: 1\n")
