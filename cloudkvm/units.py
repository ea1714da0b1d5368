"""Human sizes for memory and disks: `512M`, `4G`, `4GiB`, `4096` (a bare number means MiB)."""
import re

from .errors import CloudkvmError

_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
MAX_DIGITS = 30  # no disk or RAM size needs more (10^30 MiB); also keeps the arithmetic small


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes for a size; a bare number is MiB (as QEMU's -m). Binary units: 1G = 1 GiB."""
    if isinstance(text, int):
        return text << 20
    match = _SIZE.match(str(text))
    if not match:
        raise CloudkvmError(f"{what}: cannot read '{text}' as a size", "write e.g. 512M, 4G, 4GiB or 4096 (MiB)")
    number, unit = match.groups()
    whole, _, fraction = number.partition(".")
    if len(whole.lstrip("0")) > MAX_DIGITS:
        shown = text if len(str(text)) <= 40 else str(text)[:37] + "..."
        raise CloudkvmError(f"{what}: '{shown}' is too large", "write e.g. 512M, 4G or 2T")
    fraction = fraction[:MAX_DIGITS]  # later digits are worth less than a byte
    # exact integer arithmetic: through a float, 9999999999999999M and 9999999999999999 (MiB) would differ
    value = int(whole + fraction) * _UNITS[unit.lower()] // 10 ** len(fraction)
    if value <= 0:
        raise CloudkvmError(f"{what}: '{text}' is not a positive size", "write e.g. 512M or 4G")
    return value
