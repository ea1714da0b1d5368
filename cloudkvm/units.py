"""Human sizes for memory and disks: `512M`, `4G`, `4GiB`, `4096` (a bare number means MiB)."""
import re

from .errors import CloudkvmError

_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)  # matched against stripped text
MAX_DIGITS = 30       # no disk or RAM size needs more (10^30 MiB); also keeps the arithmetic small
MAX_TEXT = 64         # characters: a longer text is not a size (and the regex never sees hostile lengths)
MAX_BYTES = (1 << 63) - 1  # the largest file offset (off_t) and mapping length Linux can take


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes for a size; a bare number is MiB (as QEMU's -m). Binary units: 1G = 1 GiB."""
    if isinstance(text, int):
        value = text << 20
        if value > MAX_BYTES:
            raise CloudkvmError(f"{what}: {text} MiB is too large", "write e.g. 512M, 4G or 2T")
        return value
    text = str(text).strip()
    shown = text if len(text) <= 40 else text[:37] + "..."
    if len(text) > MAX_TEXT and text.lstrip("0")[:MAX_DIGITS + 1].isdigit():
        raise CloudkvmError(f"{what}: '{shown}' is too large", "write e.g. 512M, 4G or 2T")
    match = _SIZE.fullmatch(text) if len(text) <= MAX_TEXT else None
    if not match:
        raise CloudkvmError(f"{what}: cannot read '{shown}' as a size", "write e.g. 512M, 4G, 4GiB or 4096 (MiB)")
    number, unit = match.groups()
    whole, _, fraction = number.partition(".")
    if len(whole.lstrip("0")) > MAX_DIGITS:
        raise CloudkvmError(f"{what}: '{shown}' is too large", "write e.g. 512M, 4G or 2T")
    fraction = fraction[:MAX_DIGITS]  # later digits are worth less than a byte
    # exact integer arithmetic: through a float, 9999999999999999M and 9999999999999999 (MiB) would differ
    value = int(whole + fraction) * _UNITS[unit.lower()] // 10 ** len(fraction)
    if value <= 0:
        raise CloudkvmError(f"{what}: '{shown}' is not a positive size", "write e.g. 512M or 4G")
    if value > MAX_BYTES:
        raise CloudkvmError(f"{what}: '{shown}' is too large (at most 8 EiB)", "write e.g. 512M, 4G or 2T")
    return value
