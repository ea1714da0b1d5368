"""Fixtures for the profile tests: small profile trees in tmp_path (constants: profile_testdata.py)."""
from pathlib import Path
from textwrap import dedent

import pytest


@pytest.fixture
def tree(tmp_path):
    """tree({"a.yaml": "...", "sub/k": "x"}) writes files (YAML dedented) under tmp_path and returns tmp_path."""
    def write(files: dict[str, str]) -> Path:
        for name, text in files.items():
            target = tmp_path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(dedent(text).lstrip("\n") if name.endswith(".yaml") else text)
        return tmp_path
    return write


@pytest.fixture
def stubs(tree):
    """A folder with a stub kernel, initrd and disk (their existence is all a profile checks)."""
    return tree({"vmlinuz": "kernel", "initrd.img": "initrd", "disk.qcow2": "disk", "disk.raw": "raw"})
