"""Build hook: compiles the cffi KVM core (cloudkvm/kvm/_build.py) against <linux/kvm.h>."""
from setuptools import setup

setup(cffi_modules=["cloudkvm/kvm/_build.py:ffibuilder"])
