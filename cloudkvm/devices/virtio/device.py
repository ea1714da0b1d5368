"""The transport-independent part of a virtio device (virtio 1.2 §2): identity, features, config space, queues."""
import logging
from typing import Callable

from .queue import BadChain, Virtqueue

log = logging.getLogger("cloudkvm.virtio")

# virtio 1.2 §6: "A device MUST offer VIRTIO_F_VERSION_1".
VIRTIO_F_VERSION_1 = 32


class VirtioDevice:
    """Base class for device models. A transport drives it:

    - `device_id`, `features` (the device-type bits it offers, 64-bit), `queue_max_sizes` (one per queue),
      `config` (the device-specific configuration space, little-endian bytes);
    - `acked_features` is set by the transport once feature negotiation succeeded (FEATURES_OK);
    - `activate(queues)` at DRIVER_OK, `process(index, queue)` on every available buffer notification (returns
      whether used buffers were added), `reset()` on a device reset;
    - `needs_reset` set by the device when it met an error it cannot recover from (the transport then presents
      DEVICE_NEEDS_RESET and stops calling `process` until the driver resets the device).

    Methods are called with the transport's lock held, never concurrently.
    """

    device_id = 0
    name = "virtio"

    def __init__(self, features: int = 0, queue_max_sizes: tuple[int, ...] = (256,), config: bytes = b""):
        self.features = features
        self.queue_max_sizes = tuple(queue_max_sizes)
        self.config = bytearray(config)
        self.acked_features = 0
        self.needs_reset = False
        self.queues: list[Virtqueue] = []
        self.on_config_change: Callable[[], None] | None = None   # set by the transport
        self.transport = None  # the transport driving this device (set by it), for device-initiated work
        self._logged: set[str] = set()

    @property
    def num_queues(self) -> int:
        return len(self.queue_max_sizes)

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    # ---- configuration space -----------------------------------------------------------------------------------

    def read_config(self, offset: int, size: int) -> int:
        """A little-endian read; the transport has checked that [offset, offset+size) lies inside `config`."""
        return int.from_bytes(self.config[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Drivers write only fields a feature makes writable; by default nothing is."""
        self.warn_once("config-write", "%s: driver wrote config offset 0x%x (size %d); ignored", self.name, offset,
                       size)

    def signal_config_change(self) -> None:
        """Tell the driver the configuration space changed (the transport bumps ConfigGeneration and interrupts)."""
        if self.on_config_change is not None:
            self.on_config_change()

    # ---- life cycle ----------------------------------------------------------------------------------------------

    def activate(self, queues: list[Virtqueue]) -> None:
        self.queues = queues

    def reset(self) -> None:
        self.acked_features = 0
        self.needs_reset = False
        self.queues = []

    def process(self, queue_index: int, queue: Virtqueue) -> bool:
        raise NotImplementedError

    def native_serve(self, queue_index: int):
        """(CKVM_SERVE_* kind, C state) when a C path serves this queue's notifications by itself (notifier.py),
        else None (every notification is `process`)."""
        return None

    # ---- errors ----------------------------------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """An error the device cannot recover from without a reset: DEVICE_NEEDS_RESET."""
        log.warning("%s: %s; the device needs a reset", self.name, reason)
        self.needs_reset = True

    def warn_once(self, key: str, msg: str, *args) -> None:
        """Log a guest-caused problem at WARNING the first time per kind, at DEBUG afterwards (a guest can repeat)."""
        if key in self._logged:
            log.debug(msg, *args)
        else:
            self._logged.add(key)
            log.warning(msg, *args)

    def available_chains(self, queue: Virtqueue):
        """Yield the queue's valid available chains until it is empty or the device needs a reset. Bad chains
        are handed to `bad_chain` on the way; `self.completed_bad` says whether that added used buffers."""
        self.completed_bad = False
        while not self.needs_reset:
            try:
                chain = queue.pop()
            except BadChain as e:
                self.completed_bad |= self.bad_chain(queue, e)
                continue
            if chain is None:
                return
            yield chain

    def bad_chain(self, queue: Virtqueue, exc: BadChain) -> bool:
        """Default handling of a chain that failed validation: hand it back empty, or need a reset.

        Returns whether a used buffer was added. Devices whose requests carry a status byte override this.
        """
        self.warn_once("chain-" + exc.kind, "%s: bad descriptor chain: %s", self.name, exc.reason)
        if exc.head is None:
            self.fail(f"cannot complete a request: {exc.reason}")
            return False
        queue.push(exc.head, 0)
        return True
