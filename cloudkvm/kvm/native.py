"""Loads the compiled cffi KVM core, building it in place on first use from a never-installed source tree."""
import importlib


def _load():
    try:
        return importlib.import_module("cloudkvm.kvm._native")
    except ImportError:
        import os
        import sys

        here = os.path.dirname(os.path.abspath(__file__))
        sys.path.insert(0, here)
        try:
            import _build  # noqa: PLC0415  (the builder lives beside this file)
        finally:
            sys.path.pop(0)
        _build.ffibuilder.compile(tmpdir=os.path.dirname(os.path.dirname(here)))
        return importlib.import_module("cloudkvm.kvm._native")


_mod = _load()
ffi = _mod.ffi
lib = _mod.lib
