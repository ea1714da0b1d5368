"""The x86_64 board: `board.py` (the `X86Board` the machine drives), `layout.py` (every address, port and IRQ),
`cpu.py` (the CPUID policy), and the boot assists for interpreting KVMs (`assist.py`, `complete.py`,
`syscall.py`, `kvm_access.py`). Nothing outside `cloudkvm/boards/` imports these: it asks `boards.registry`."""
