"""Warning-class lines of a Linux boot log, normalised so two VMMs' logs of one kernel can be compared."""
import re

# What a clean boot must not print; each names a kernel defect report or a complaint about the virtual platform.
WARNING_CLASS = re.compile(
    r"WARNING:|Call Trace|BUG:|Oops|mtrr:|tsc: Marking|Firmware Bug|Firmware Warn|FW BUG|"
    r"Kernel panic|segfault|general protection|unchecked MSR|unhandled|inconsistent|"
    r"ACPI (Error|Warning)|ACPI BIOS (Error|Warning)|clocksource .* unstable|TSC.*unsynchronized")
_TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\]\s*")
_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\b[0-9a-fA-F]{8,}\b|\d+")


def normalise(line: str) -> str:
    """The line without its timestamp and with every number as '#': the message, not this boot's values."""
    return _NUMBERS.sub("#", _TIMESTAMP.sub("", line.strip()))


def warning_lines(log: str) -> dict[str, str]:
    """Normalised warning-class message -> the first line that printed it."""
    found: dict[str, str] = {}
    for line in log.splitlines():
        if WARNING_CLASS.search(line):
            found.setdefault(normalise(line), line.strip())
    return found


def only_in(log: str, reference: str) -> list[str]:
    """Warning-class lines of `log` whose message the reference log of the same kernel does not have."""
    ours, theirs = warning_lines(log), warning_lines(reference)
    return [line for key, line in ours.items() if key not in theirs]
