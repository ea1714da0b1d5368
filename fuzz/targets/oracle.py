"""What the harnesses share: the `Crash` verdict, a watch on the virtio logger for swallowed exceptions, and a
register-level virtio-mmio driver start-up (virtio 1.2 §3.1.1, §4.2.3) for the device targets."""
import contextlib
import logging
import os
import tempfile

from cloudkvm.devices.virtio import mmio


def private_folder(prefix: str) -> str:
    """A new folder for a harness's files: on /dev/shm when there is one (no disk I/O per input), else $TMPDIR."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix=prefix, dir=shm)


class Crash(AssertionError):
    """The input made the code under test break a promise (not one of its documented outcomes)."""


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def no_swallowed_exceptions(injected: type | None = None, logger_name: str = "cloudkvm.virtio"):
    """The virtio transport catches every exception from a device and logs it before it marks the device
    DEVICE_NEEDS_RESET, so the VMM survives, and virtio-blk answers an I/O error for an exception from its disk;
    for a fuzzer either is still a bug in the device when the exception is not one the harness's backend raised on
    purpose (`injected`). Found here from the log: an ERROR record, or a record that carries an exception object
    other than an `injected` one, raises Crash. Guest-caused problems are logged as text (documented outcomes).
    The logger's level, propagation and handlers are restored afterwards (the tests watch the same logger)."""
    logger = logging.getLogger(logger_name)
    handler = _Collect()
    saved = logger.level, logger.propagate
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    for record in handler.records:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            exc = next((a for a in record.args or () if isinstance(a, BaseException)
                        and not (injected is not None and isinstance(a, injected))), None)
        if record.levelno >= logging.ERROR or exc is not None:
            detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
            raise Crash(f"the device swallowed an exception ({record.getMessage()}{detail})") from exc


def start_device(transport, accept: int, queues: list[tuple[int, int, int, int, int]]) -> bool:
    """Initialise a device through its registers as Linux's virtio_mmio driver does: reset, ACKNOWLEDGE, DRIVER,
    the offered features & `accept`, FEATURES_OK (re-read), then each (index, size, desc, avail, used) queue, then
    DRIVER_OK. Returns whether the device went live (FEATURES_OK accepted, no DEVICE_NEEDS_RESET)."""
    def w(offset: int, value: int) -> None:
        transport.write(offset, 4, value)

    def r(offset: int) -> int:
        return transport.read(offset, 4)

    w(mmio.STATUS, 0)
    w(mmio.STATUS, mmio.ACKNOWLEDGE)
    w(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER)
    offered = 0
    for sel in (0, 1):
        w(mmio.DEVICE_FEATURES_SEL, sel)
        offered |= r(mmio.DEVICE_FEATURES) << (32 * sel)
    features = offered & accept
    for sel in (0, 1):
        w(mmio.DRIVER_FEATURES_SEL, sel)
        w(mmio.DRIVER_FEATURES, features >> (32 * sel) & 0xFFFFFFFF)
    w(mmio.STATUS, r(mmio.STATUS) | mmio.FEATURES_OK)
    features_ok = bool(r(mmio.STATUS) & mmio.FEATURES_OK)
    for index, size, desc, avail, used in queues:
        w(mmio.QUEUE_SEL, index)
        w(mmio.QUEUE_NUM, size)
        w(mmio.QUEUE_DESC_LOW, desc & 0xFFFFFFFF)
        w(mmio.QUEUE_DESC_HIGH, desc >> 32)
        w(mmio.QUEUE_DRIVER_LOW, avail & 0xFFFFFFFF)
        w(mmio.QUEUE_DRIVER_HIGH, avail >> 32)
        w(mmio.QUEUE_DEVICE_LOW, used & 0xFFFFFFFF)
        w(mmio.QUEUE_DEVICE_HIGH, used >> 32)
        w(mmio.QUEUE_READY, 1)
    w(mmio.STATUS, r(mmio.STATUS) | mmio.DRIVER_OK)
    return features_ok and not r(mmio.STATUS) & mmio.DEVICE_NEEDS_RESET

