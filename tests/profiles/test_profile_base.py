"""`base:` inheritance: maps merge key by key, lists concatenate (base first), the child wins on scalars; paths
stay relative to the file that wrote them; `${VAR}` works in every file; errors point into the right file."""
import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.profile import MiB, load_profile, validate_profile
from profile_testdata import PROFILES

GiB = 1 << 30

BASE = """
    name: base
    arch: x86_64
    cpu: {model: host, hide: [cx16]}
    cpus: 2
    memory: 1G
    boot:
      kernel: vmlinuz
      initrd: initrd.img
      cmdline: console=ttyS0
    disks:
      - file: disk.qcow2
        overlay: true
    network:
      mode: user
      restrict: true
      forwards: [tcp:127.0.0.1:2222-:22]
    console: {log: base.log}
    """


def test_maps_merge_lists_concatenate_child_wins(stubs, tree):
    tree({"base.yaml": BASE, "child.yaml": """
        base: base.yaml
        name: child
        cpu: {hide: [avx512f]}
        memory: 2G
        boot:
          cmdline: console=ttyS0 quiet
        disks:
          - file: disk.raw
            read_only: true
        network:
          forwards: [tcp:127.0.0.1:8080-:80]
        daemonize: false
        """})
    p = load_profile(stubs / "child.yaml", env={})
    assert (p.name, p.arch, p.cpus, p.memory, p.daemonize) == ("child", "x86_64", 2, 2 * GiB, False)
    assert p.cpu.hide == ["cx16", "avx512f"]
    assert p.boot.kernel == stubs / "vmlinuz" and p.boot.initrd == stubs / "initrd.img"  # kept from the base
    assert p.boot.cmdline == "console=ttyS0 quiet"  # the child's scalar wins
    assert [(d.file.name, d.overlay, d.read_only) for d in p.disks] == [("disk.qcow2", True, False),
                                                                          ("disk.raw", False, True)]
    assert (p.network.mode, p.network.restrict) == ("user", True)
    assert [f.spec() for f in p.network.forwards] == ["tcp:127.0.0.1:2222-:22", "tcp:127.0.0.1:8080-:80"]
    assert p.console.log == stubs / "base.log"


def test_a_scalar_replaces_a_map_and_the_other_way_round(stubs, tree):
    tree({"base.yaml": BASE, "child.yaml": """
        base: base.yaml
        name: child
        cpu: host
        network: none
        """})
    p = load_profile(stubs / "child.yaml", env={})
    assert p.cpu.hide == [] and p.network.mode == "none" and p.network.forwards == []


def test_several_bases_apply_in_order(stubs, tree):
    tree({"a.yaml": "memory: 1G\ncpus: 1\ndisks: [{file: disk.qcow2}]\n",
          "b.yaml": "memory: 2G\ndisks: [{file: disk.raw}]\nboot: {kernel: vmlinuz}\n",
          "c.yaml": "base: [a.yaml, b.yaml]\nname: c\ncpus: 3\ndisks: [{file: disk.qcow2, read_only: true}]\n"})
    p = load_profile(stubs / "c.yaml", env={})
    assert (p.memory, p.cpus) == (2 * GiB, 3)
    assert [(d.file.name, d.read_only) for d in p.disks] == [("disk.qcow2", False), ("disk.raw", False),
                                                               ("disk.qcow2", True)]


def test_paths_are_relative_to_the_file_that_writes_them(tree):
    root = tree({
        "images/vmlinuz": "k", "images/base.qcow2": "d", "vms/dev/data.qcow2": "d", "vms/dev/dev.log": "",
        "common/base.yaml": """
            boot:
              kernel: ../images/vmlinuz
            disks:
              - file: ../images/base.qcow2
                overlay: true
            """,
        "common/mid.yaml": "base: base.yaml\nmemory: 1G\n",
        "vms/dev/dev.yaml": """
            base: ../../common/mid.yaml
            name: dev
            disks:
              - file: data.qcow2
            console: {log: dev.log}
            """})
    p = load_profile(root / "vms" / "dev" / "dev.yaml", env={})
    assert p.boot.kernel == root / "images" / "vmlinuz"
    assert [d.file for d in p.disks] == [root / "images" / "base.qcow2", root / "vms" / "dev" / "data.qcow2"]
    assert p.console.log == root / "vms" / "dev" / "dev.log"
    assert p.memory == GiB
    assert p.where("disks", 0, "file").startswith(str(root / "common" / "base.yaml") + ":4:")
    assert p.where("disks", 1, "file").startswith(str(root / "vms" / "dev" / "dev.yaml") + ":4:")


def test_env_expansion_in_every_file_and_in_base_paths(stubs, tree):
    tree({"shared/base.yaml": "memory: ${MEM:-3G}\nboot: {kernel: '${KDIR:-..}/vmlinuz', cmdline: '${ARGS}'}\n",
          "child.yaml": "base: ${BASES:-shared}/base.yaml\nname: ${NAME:-dflt}\n"})
    p = load_profile(stubs / "child.yaml", env={"ARGS": "quiet"})
    assert (p.name, p.memory, p.boot.kernel, p.boot.cmdline) == ("dflt", 3 * GiB, stubs / "vmlinuz", "quiet")
    p = load_profile(stubs / "child.yaml", env={"ARGS": "", "MEM": "64M", "NAME": "n", "KDIR": str(stubs)})
    assert (p.name, p.memory, p.boot.cmdline) == ("n", 64 * MiB, "")
    with pytest.raises(CloudkvmError, match=r"shared/base\.yaml:2:\d+: boot\.cmdline: environment variable ARGS"):
        load_profile(stubs / "child.yaml", env={})


def test_a_diamond_is_not_a_cycle(stubs, tree):
    tree({"root.yaml": "boot: {kernel: vmlinuz}\ncpus: 2\n", "left.yaml": "base: root.yaml\nmemory: 1G\n",
          "right.yaml": "base: root.yaml\ncpus: 4\n", "top.yaml": "base: [left.yaml, right.yaml]\nname: top\n"})
    p = load_profile(stubs / "top.yaml", env={})
    assert (p.cpus, p.memory) == (4, GiB)


def test_a_profile_cannot_be_its_own_base(tree):
    folder = tree({"self.yaml": "name: me\nbase: ./self.yaml\nboot: {kernel: k}\n"})
    with pytest.raises(CloudkvmError, match=r"self\.yaml:2:7: base: base cycle: self\.yaml -> self\.yaml"):
        load_profile(folder / "self.yaml", check_files=False)


def test_base_urls_are_refused_without_a_network_access(tree):
    folder = tree({"p.yaml": "name: u\nbase: [ok.yaml, 'http://192.0.2.1/p.yaml']\n", "ok.yaml": "cpus: 1\n"})
    with pytest.raises(CloudkvmError, match=r"p\.yaml:2:17: base\[1\]: base URLs are not supported yet"):
        load_profile(folder / "p.yaml")


def test_validate_profile_resolves_base_against_base_dir(stubs, tree):
    tree({"base.yaml": BASE})
    p = validate_profile({"base": "base.yaml", "name": "from-dict", "cpus": 8}, stubs, env={})
    assert (p.name, p.cpus, p.boot.kernel) == ("from-dict", 8, stubs / "vmlinuz")


def test_the_example_dev_profile_inherits_from_debian_cloud():
    base = load_profile(PROFILES / "debian-cloud-x86_64.yaml", env={}, check_files=False)
    dev = load_profile(PROFILES / "examples" / "dev.yaml", env={}, check_files=False)
    assert dev.name == "debian-dev" and dev.cpus == 4 and dev.memory == 8 * GiB
    assert dev.boot == base.boot and dev.cpu == base.cpu
    assert dev.disks[0] == base.disks[0]
    assert dev.disks[1].file == PROFILES / "examples" / "data.qcow2"
    assert [f.spec() for f in dev.network.forwards] == ["tcp:127.0.0.1:2222-:22", "tcp:127.0.0.1:8080-:8080"]
    assert dev.daemonize is False
    other = load_profile(PROFILES / "examples" / "dev.yaml", env={"DEV_MEMORY": "2G", "DEV_HTTP_PORT": "9090"},
                         check_files=False)
    assert other.memory == 2 * GiB and other.network.forwards[1].host_port == 9090
