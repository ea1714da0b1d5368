"""Virtio devices (OASIS virtio 1.2): the split virtqueue, the virtio-mmio transport, block and entropy devices.

Every guest-supplied address and length goes through `GuestMemory`; a bad request fails that request (or puts the
device into DEVICE_NEEDS_RESET), never the VMM.
"""
from .blk import VirtioBlk
from .device import VirtioDevice
from .mmio import NOTIFY_OFFSET, VirtioMmioTransport
from .queue import BadChain, BadQueue, Chain, Virtqueue, VirtqueueError
from .rng import VirtioRng

__all__ = ["BadChain", "BadQueue", "Chain", "NOTIFY_OFFSET", "VirtioBlk", "VirtioDevice", "VirtioMmioTransport",
           "VirtioRng", "Virtqueue", "VirtqueueError"]
