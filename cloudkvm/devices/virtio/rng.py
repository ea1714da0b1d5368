"""virtio-rng, the entropy device (virtio 1.2 §5.4): fills device-writable buffers from the host's os.urandom."""
import os
from typing import Callable

from .device import VirtioDevice
from .queue import Virtqueue

VIRTIO_ID_ENTROPY = 4      # §5.4.1
QUEUE_SIZE = 256
MAX_PER_REQUEST = 64 << 10  # §5.4.6.2: the device MAY use less than the whole buffer


class VirtioRng(VirtioDevice):
    """One request queue; each chain gets up to `max_per_request` random bytes, from its first writable byte on."""

    device_id = VIRTIO_ID_ENTROPY
    name = "virtio-rng"

    def __init__(self, max_per_request: int = MAX_PER_REQUEST, source: Callable[[int], bytes] = os.urandom):
        if max_per_request <= 0:
            raise ValueError("max_per_request must be positive")
        super().__init__(0, (QUEUE_SIZE,))
        self.max_per_request = max_per_request
        self.source = source

    def process(self, queue_index: int, queue: Virtqueue) -> bool:
        added = False
        for chain in self.available_chains(queue):
            if chain.readable:   # §5.4.6.1: the driver MUST NOT; we read nothing from them
                self.warn_once("readable", "%s: request %d has device-readable buffers; ignored", self.name,
                               chain.head)
            budget = self.max_per_request
            written = 0
            for gpa, length in chain.writable:
                n = min(length, budget - written)
                if n <= 0:
                    break
                queue.memory.write(gpa, self.source(n))
                written += n
            queue.push(chain.head, written)
            added = True
        return added or self.completed_bad
