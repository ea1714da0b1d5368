"""The user-error family: a one-line message plus a hint; the CLI turns these into exit code 2."""


class CloudkvmError(Exception):
    """A user-facing error: what is wrong (naming the file, field or offset) and how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class FieldError(ValueError):
    """A validator's complaint about a place below the field being validated (`loc`, e.g. ("forwards", 1,
    "guest_ip")), with a hint; the profile loader turns it into a CloudkvmError at that place's file:line:col."""

    def __init__(self, message: str, loc: tuple = (), hint: str = ""):
        super().__init__(message)
        self.loc = tuple(loc)
        self.hint = hint


class KvmUnavailable(CloudkvmError):
    """/dev/kvm is missing, not permitted, or speaks an API we do not know."""


class GuestMemoryError(Exception):
    """A guest-supplied address or length falls outside guest RAM (never a user error: the guest is wrong)."""


def printable(text: str) -> str:
    """`text` safe for a terminal: control characters from a profile or image (escape sequences, bells, newlines)
    are shown as escapes instead of acting on the user's terminal."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
