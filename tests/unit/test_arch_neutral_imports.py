"""Imports point down (docs/architecture.md): the arch-neutral modules import no x86 module, and nothing above
`boards/` imports a board's own modules, only `boards.registry` and `boards.base`. Read from the source with `ast`
(every import statement, also the ones inside functions), so a lazy import cannot hide."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "cloudkvm"
ARCH_NEUTRAL = ("machine.py", "vcpu_loop.py", "launcher.py", "profile.py", "qemu_cmdline.py", "preflight.py",
                "cli.py", "net/slirp.py")
# x86 knowledge: the x86 board's folder (and its old flat modules), the x86 boot protocol and long-mode tables, the
# x86 ACPI tables, the PC devices, and the built-in guests (x86_64 binaries and Debian's amd64 kernel).
X86_MODULES = ("cloudkvm.boards.x86", "cloudkvm.boards.x86_", "cloudkvm.boot.linux_x86", "cloudkvm.boot.x86_longmode",
               "cloudkvm.boot.acpi", "cloudkvm.devices.uart16550", "cloudkvm.devices.i8042",
               "cloudkvm.devices.cmos_rtc", "cloudkvm.devices.acpi_power", "cloudkvm.devices.legacy",
               "cloudkvm.guests")
BOARD_INTERFACE = ("cloudkvm.boards", "cloudkvm.boards.registry", "cloudkvm.boards.base")


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, relative imports resolved (for `from x import y`, both
    x and x.y: y may be a submodule)."""
    package = ".".join(("cloudkvm", *path.relative_to(PACKAGE).parent.parts))
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _is(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix if prefix.endswith("_") else prefix + ".")


def test_the_resolver_sees_relative_lazy_and_absolute_imports():
    source = PACKAGE / "cli.py"
    found = imported_modules(source)
    assert "cloudkvm.boards.registry" in found      # `from .boards import registry`, inside functions
    assert "cloudkvm.errors.CloudkvmError" in found and "typer" in found
    assert imported_modules(PACKAGE / "net" / "slirp.py") >= {"cloudkvm.errors", "cloudkvm.net.slirp_ffi"}
    assert _is("cloudkvm.boards.x86.cpu", "cloudkvm.boards.x86") and _is("cloudkvm.boards.x86_cpu",
                                                                         "cloudkvm.boards.x86_")
    assert not _is("cloudkvm.boards.x86ish", "cloudkvm.boards.x86")


@pytest.mark.parametrize("name", ARCH_NEUTRAL)
def test_arch_neutral_modules_import_no_x86_module(name):
    found = imported_modules(PACKAGE / name)
    bad = sorted(m for m in found if any(_is(m, x86) for x86 in X86_MODULES))
    assert not bad, f"{name} imports x86 modules: {bad}"


@pytest.mark.parametrize("path", sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                                        if p.relative_to(PACKAGE).parts[0] not in ("boards", "guests")))
def test_nothing_above_boards_imports_a_boards_internals(path):
    """`guests/` builds the boards' test guests and is not above them; everything else reaches a board through
    the registry and the base interface only."""
    found = imported_modules(PACKAGE / path)
    internals = sorted(m for m in found if _is(m, "cloudkvm.boards") and not any(
        m == allowed or m.startswith(allowed + ".") and allowed != "cloudkvm.boards"
        for allowed in BOARD_INTERFACE))
    assert not internals, f"{path} imports board internals: {internals}"


def _code_words(path: Path) -> tuple[set[str], list[str]]:
    """The identifiers (names, attributes, definitions, arguments) and the non-docstring string constants of a
    module: what its code says, its documentation aside."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    words = set()
    strings = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            words.add(node.name)
        elif isinstance(node, ast.arg):
            words.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            strings.append(node.value)
    return words, strings


@pytest.mark.parametrize("name", ("machine.py", "vcpu_loop.py"))
def test_the_machine_and_the_vcpu_loop_speak_of_no_x86_register_exit_or_console(name):
    words, strings = _code_words(PACKAGE / name)
    assert not words & {"rip", "sample_rips", "KVM_EXIT_SHUTDOWN", "X86Board", "CpuPolicy", "linux_x86"}
    assert not [s for s in strings if any(x86 in s for x86 in ("ttyS0", "triple", "RIP", "x86"))]


def test_the_word_check_sees_code_and_skips_documentation():
    words, strings = _code_words(PACKAGE / "boards" / "x86" / "board.py")
    assert "KVM_EXIT_SHUTDOWN" in words and "rip" in words
    assert any("triple-faulted" in s for s in strings)
    assert not any(s.startswith("The x86_64 board:") for s in strings)  # the module docstring
