"""The YAML event parser the bounded loaders build on (profile.py, images/cloudinit.py): libyaml's, which is fast
and linear on a megabyte of input, or PyYAML's pure-Python one with the same events where libyaml is missing."""
import yaml

try:
    from yaml._yaml import CParser as EventParser
except ImportError:  # PyYAML built without libyaml: the same checks, slower
    class EventParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
        def __init__(self, text: str):
            yaml.reader.Reader.__init__(self, text)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
