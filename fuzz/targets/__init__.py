"""Fuzz targets: one module per parser, each with `one_input(data) -> str` (the outcome's name).

`one_input` returns for every documented outcome (the input is refused with the error the format documents, or
served) and raises for anything else: `Crash` when an oracle finds a broken promise, or whatever unexpected
exception escaped the code under test. Each module also names its libFuzzer settings (`MAX_LEN`, `TIMEOUT`,
`INSTRUMENT` / `UNINSTRUMENTED`: what atheris instruments for coverage). The modules import without atheris, so the
regression tests (tests/fuzz) run the same code on the saved inputs.
"""
import importlib
import importlib.util
import os

TARGETS = {
    "virtqueue": "targets.virtqueue",          # cloudkvm/devices/virtio/queue.py: the split-virtqueue walker
    "virtio_blk": "targets.virtio_blk",        # cloudkvm/devices/virtio/blk.py: block requests
    "virtio_net": "targets.virtio_net",        # cloudkvm/devices/virtio/net.py: transmit and receive frames
    "qcow2": "targets.qcow2",                  # cloudkvm/storage/qcow2*.py: open, read, small writes
    "profile": "targets.profile_loader",       # cloudkvm/profile.py: load_profile on YAML text
}


def source(name: str) -> str:
    """The file of target `name`: a key of TARGETS, or the path of a harness file (one under development, or the
    tests' deliberately crashing one)."""
    if name.endswith(".py") and os.path.isfile(name):
        return os.path.abspath(name)
    if name not in TARGETS:
        raise SystemExit(f"unknown fuzz target {name!r}; one of: {', '.join(TARGETS)} (or a harness .py file)")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), TARGETS[name].split(".", 1)[1] + ".py")


def instrumentation(name: str) -> tuple[list[str], list[str]]:
    """A target's INSTRUMENT (top-level packages atheris instruments, e.g. "cloudkvm") and UNINSTRUMENTED (modules
    left alone inside them: helpers whose coverage says nothing about the parser and only costs time), read from
    its source without importing it (that would import cloudkvm before atheris can instrument it)."""
    import ast
    with open(source(name)) as f:
        tree = ast.parse(f.read())
    found = {"INSTRUMENT": ["cloudkvm"], "UNINSTRUMENTED": []}
    for node in tree.body:
        names = [getattr(t, "id", None) for t in node.targets] if isinstance(node, ast.Assign) else []
        if len(names) == 1 and names[0] in found:
            found[names[0]] = list(ast.literal_eval(node.value))
    return found["INSTRUMENT"], found["UNINSTRUMENTED"]


def load(name: str):
    """The target module called `name` (a key of TARGETS, or a harness file)."""
    if name in TARGETS:
        return importlib.import_module(TARGETS[name])
    path = source(name)
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
