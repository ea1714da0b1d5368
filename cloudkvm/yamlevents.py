"""What the bounded YAML loaders (profile.py, images/cloudinit.py) share: the event parser they build on (libyaml's,
fast and linear on a megabyte of input, or PyYAML's pure-Python one with the same events where libyaml is missing),
the check of a file's text before it is parsed, and a composer bounded in depth and size, errors at
file:line:col."""
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


class BoundedLoader(yaml.composer.Composer, EventParser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
    """PyYAML's safe loader on the event parser, with a composer that refuses a document nested deeper than
    `max_depth` (composing recurses once per level: RecursionError) or with more than `max_nodes` keys and values;
    the errors name the `kind` of file."""

    def __init__(self, text: str, display: str, kind: str, max_depth: int, max_nodes: int):
        EventParser.__init__(self, text)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self.display, self.kind, self.max_depth, self.max_nodes = display, kind, max_depth, max_nodes
        self.depth = self.nodes = 0

    def compose_node(self, parent, index):
        self.depth += 1
        self.nodes += 1
        try:
            if self.depth > self.max_depth or self.nodes > self.max_nodes:
                mark = self.peek_event().start_mark
                message, hint = (f"the {self.kind} is nested more than {self.max_depth} levels deep",
                                 f"a {self.kind}'s maps and lists nest a few levels") \
                    if self.depth > self.max_depth else \
                    (f"the {self.kind} has more than {self.max_nodes} keys and values", f"a {self.kind} is small")
                raise CloudkvmError(f"{self.display}:{mark.line + 1}:{mark.column + 1}: {message}", hint)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1
