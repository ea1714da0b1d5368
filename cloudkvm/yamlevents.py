"""What the bounded YAML loaders (profile.py, images/cloudinit.py) share: the event parser they build on (libyaml's,
fast and linear on a megabyte of input, or PyYAML's pure-Python one with the same events where libyaml is missing)
and the check of a file's text before it is parsed, with errors at file:line:col."""
import yaml

from .errors import CloudkvmError

try:
    from yaml._yaml import CParser as EventParser
except ImportError:  # PyYAML built without libyaml: the same checks, slower
    class EventParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
        def __init__(self, text: str):
            yaml.reader.Reader.__init__(self, text)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)


def line_col(text, at: int) -> tuple[int, int]:
    """1-based line and column of offset `at` in `text` (str or bytes)."""
    newline = "\n" if isinstance(text, str) else b"\n"
    return text.count(newline, 0, at) + 1, at - (text.rfind(newline, 0, at) + 1) + 1


def yaml_text(data: bytes | str, display: str, kind: str) -> str:
    """`data` as text a YAML stream may hold (YAML 1.1 §5.1): UTF-8, no control characters; else a one-line error
    at `display:line:col` naming the `kind` of file."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line, col = line_col(data, exc.start)
            raise CloudkvmError(f"{display}:{line}:{col}: not UTF-8 text", f"save the {kind} as UTF-8") from None
    bad = yaml.reader.Reader.NON_PRINTABLE.search(data)
    if bad:
        line, col = line_col(data, bad.start())
        what = "a NUL byte" if bad.group() == "\0" else f"the control character {bad.group()!r}"
        raise CloudkvmError(f"{display}:{line}:{col}: {what}", f"a {kind} is UTF-8 text without control characters")
    return data
