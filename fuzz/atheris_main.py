"""libFuzzer entry point (atheris): `python3 fuzz/atheris_main.py TARGET [libFuzzer flags] [corpus dirs or files]`.

TARGET is a name from fuzz/targets or a harness file. The target's module and the packages it names in
`INSTRUMENT` (but not its `UNINSTRUMENTED` modules) are imported under atheris's coverage instrumentation; anything
`one_input` raises is a crash (libFuzzer saves the input as `crash-<sha1>`), as is an input that runs past
`-timeout` seconds (default: the target's TIMEOUT) or a process above `-rss_limit_mb`. `-max_len` defaults to the
target's MAX_LEN. `fuzz/run` supplies the other flags.
"""
import os
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))   # this tree's cloudkvm, even when another is installed


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise SystemExit("usage: atheris_main.py TARGET [libFuzzer flags] [corpus...]")
    name = sys.argv.pop(1)
    import targets
    include, exclude = targets.instrumentation(name)
    with atheris.instrument_imports(include=include, exclude=exclude):
        module = targets.load(name)
    one_input = module.one_input
    # the target's input size limit and per-input time limit, unless the command line gives them
    for flag, value in (("-max_len=", getattr(module, "MAX_LEN", 4096)),
                        ("-timeout=", getattr(module, "TIMEOUT", 10))):
        if not any(arg.startswith(flag) for arg in sys.argv[1:]):
            sys.argv.insert(1, f"{flag}{value}")

    def test_one_input(data: bytes) -> None:
        one_input(data)

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
