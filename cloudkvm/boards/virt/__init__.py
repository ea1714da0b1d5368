"""The aarch64 `virt` board: QEMU's `virt` machine memory map and device tree (hw/arm/virt.c), driven through KVM."""
