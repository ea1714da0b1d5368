"""Loads the compiled cffi KVM core, building it in place on first use from a never-installed source tree.

`quick` calls a few of the core's short, never-blocking helpers (a lock tried, an interrupt decided) without
releasing the GIL: cffi releases it around every call, and on a busy host each release may hand the GIL to another
thread until its next switch (milliseconds on an emulated host), which is what these calls are made to avoid. They
take addresses (`address(cdata)`), not cdata."""
import ctypes
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


def address(cdata, of_ffi=ffi) -> int:
    """The address of `cdata` (a pointer of this module's ffi, or of `of_ffi`): what a `quick` helper takes, and how
    a pointer passes between two cffi modules."""
    return int(of_ffi.cast("uintptr_t", cdata))


def _quick():
    dll = ctypes.PyDLL(_mod.__file__)   # PyDLL: the GIL stays held during the call
    for name, restype, argtypes in (
            ("ckvm_transport_trylock", ctypes.c_int, [ctypes.c_void_p]),
            ("ckvm_transport_unlock", None, [ctypes.c_void_p]),
            ("ckvm_isr_set", None, [ctypes.c_void_p, ctypes.c_uint32]),
            ("ckvm_isr_clear", None, [ctypes.c_void_p, ctypes.c_uint32]),
            ("ckvm_vq_needs_interrupt", ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p])):
        fn = getattr(dll, name)
        fn.restype, fn.argtypes = restype, argtypes
    return dll


quick = _quick()
