"""Storage tests: qemu-img / qemu-io (Debian qemu-utils) are the oracle. Tests needing them skip, saying why,
only when they are missing."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")


class Qemu:
    """Thin wrappers over qemu-img/qemu-io that fail loudly with their output."""

    def run(self, *args, ok=(0,)) -> subprocess.CompletedProcess:
        r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
        if r.returncode not in ok:
            raise AssertionError(f"{' '.join(map(str, args))} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def img(self, *args, ok=(0,)) -> subprocess.CompletedProcess:
        return self.run(QEMU_IMG, *args, ok=ok)

    def create(self, path, size, *opts, backing=None, backing_fmt="qcow2", cluster_size=None) -> Path:
        args = ["create", "-q", "-f", "qcow2"]
        o = list(opts)
        if cluster_size:
            o.append(f"cluster_size={cluster_size}")
        if o:
            args += ["-o", ",".join(o)]
        if backing is not None:
            args += ["-b", str(backing), "-F", backing_fmt]
        args += [str(path)]
        if size is not None:
            args.append(str(size))
        self.img(*args)
        return Path(path)

    def io(self, path, *commands, fmt="qcow2") -> None:
        args = [QEMU_IO, "-f", fmt]
        for c in commands:
            args += ["-c", c]
        r = self.run(*args, str(path))
        assert "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr

    def to_raw(self, path, tmp: Path) -> bytes:
        out = tmp / (Path(path).name + ".oracle.raw")
        self.img("convert", "-O", "raw", str(path), str(out))
        data = out.read_bytes()
        out.unlink()
        return data

    def check(self, path) -> dict:
        """`qemu-img check` as JSON; asserts no corruption and no leaks."""
        r = self.img("check", "--output=json", str(path), ok=(0, 2, 3))
        info = json.loads(r.stdout)
        assert r.returncode == 0 and not info.get("corruptions") and not info.get("leaks") and \
            not info.get("check-errors"), f"qemu-img check {path}: rc={r.returncode} {r.stdout}{r.stderr}"
        return info

    def check_no_corruption(self, path) -> dict:
        """`qemu-img check`, leaks allowed (crash tests)."""
        r = self.img("check", "--output=json", str(path), ok=(0, 2, 3))
        info = json.loads(r.stdout)
        assert r.returncode in (0, 3) and not info.get("corruptions") and not info.get("check-errors"), \
            f"qemu-img check {path}: rc={r.returncode} {r.stdout}{r.stderr}"
        return info

    def info(self, path) -> dict:
        return json.loads(self.img("info", "--output=json", str(path)).stdout)

    def compare(self, a, b, fmt_a="qcow2", fmt_b="raw") -> None:
        self.img("compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b))


@pytest.fixture(scope="session")
def qemu() -> Qemu:
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.skip("qemu-img/qemu-io not installed (apt-get install qemu-utils); they are the qcow2 oracle")
    return Qemu()
