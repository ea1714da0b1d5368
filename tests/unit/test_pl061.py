"""Pl061 driven the way Linux drives it: drivers/gpio/gpio-pl061.c (byte accesses, address-masked DATA, the
irq_chip callbacks) under drivers/input/keyboard/gpio_keys.c's power key, and the power-key press helper."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudkvm.devices.pl061 import Pl061, press_power_key
from device_probe import LevelLine, access, hostile_accesses

# drivers/gpio/gpio-pl061.c
GPIODIR, GPIOIS, GPIOIBE, GPIOIEV, GPIOIE, GPIORIS, GPIOMIS, GPIOIC = (
    0x400, 0x404, 0x408, 0x40C, 0x410, 0x414, 0x418, 0x41C)
GPIOAFSEL = 0x420  # DDI 0190 Table 3-1
AMBA_CID = 0xB105F00D
POWER_PIN = 3  # QEMU include/hw/arm/virt.h GPIO_PIN_POWER_BUTTON
IRQ_TYPE_EDGE_RISING, IRQ_TYPE_EDGE_FALLING, IRQ_TYPE_LEVEL_HIGH, IRQ_TYPE_LEVEL_LOW = 1, 2, 4, 8
IRQ_TYPE_EDGE_BOTH = IRQ_TYPE_EDGE_RISING | IRQ_TYPE_EDGE_FALLING


def bit(n):
    return 1 << n


class LinuxPl061:
    """gpio-pl061.c's callbacks, transcribed (readb/writeb: one-byte accesses)."""

    def __init__(self, gpio):
        self.g = gpio

    def readb(self, off):
        return self.g.read(off, 1)

    def writeb(self, value, off):
        self.g.write(off, 1, value & 0xFF)

    def probe(self):
        self.writeb(0, GPIOIE)  # disable irqs

    def direction_input(self, offset):
        self.writeb(self.readb(GPIODIR) & ~bit(offset), GPIODIR)

    def direction_output(self, offset, value):
        self.writeb(int(bool(value)) << offset, bit(offset + 2))
        self.writeb(self.readb(GPIODIR) | bit(offset), GPIODIR)
        self.writeb(int(bool(value)) << offset, bit(offset + 2))  # again: written before DIR it is not kept

    def get_value(self, offset):
        return int(bool(self.readb(bit(offset + 2))))

    def set_value(self, offset, value):
        self.writeb(int(bool(value)) << offset, bit(offset + 2))

    def irq_type(self, offset, trigger):  # pl061_irq_type
        b = bit(offset)
        iev, is_, ibe = self.readb(GPIOIEV), self.readb(GPIOIS), self.readb(GPIOIBE)
        if trigger & (IRQ_TYPE_LEVEL_HIGH | IRQ_TYPE_LEVEL_LOW):
            ibe &= ~b
            is_ |= b
            iev = iev | b if trigger & IRQ_TYPE_LEVEL_HIGH else iev & ~b
        elif trigger & IRQ_TYPE_EDGE_BOTH == IRQ_TYPE_EDGE_BOTH:
            is_ &= ~b
            ibe |= b
        elif trigger & IRQ_TYPE_EDGE_BOTH:
            is_ &= ~b
            ibe &= ~b
            iev = iev | b if trigger & IRQ_TYPE_EDGE_RISING else iev & ~b
        self.writeb(is_, GPIOIS)
        self.writeb(ibe, GPIOIBE)
        self.writeb(iev, GPIOIEV)

    def irq_unmask(self, offset):
        self.writeb(self.readb(GPIOIE) | bit(offset), GPIOIE)

    def irq_mask(self, offset):
        self.writeb(self.readb(GPIOIE) & ~bit(offset), GPIOIE)

    def irq_ack(self, offset):
        self.writeb(bit(offset), GPIOIC)

    def handle_edge_irqs(self) -> list[int]:
        """pl061_irq_handler: read MIS, and for each pending pin handle_edge_irq: irq_ack, then the action."""
        pending = self.readb(GPIOMIS)
        pins = [n for n in range(8) if pending & bit(n)]
        for n in pins:
            self.irq_ack(n)
        return pins


class GpioKeys:
    """gpio_keys.c for one GPIO button (linux,code KEY_POWER): both edges; after each the debounce work reads
    the pin and reports its state; the input core passes on changes only."""

    def __init__(self, chip, pin):
        self.chip, self.pin = chip, pin
        self.state = 0
        self.events = []
        chip.direction_input(pin)  # GPIOD_IN
        chip.irq_type(pin, IRQ_TYPE_EDGE_BOTH)  # IRQF_TRIGGER_RISING | IRQF_TRIGGER_FALLING
        chip.irq_unmask(pin)
        self.work_pending = False

    def interrupt(self):
        if self.pin in self.chip.handle_edge_irqs():
            self.work_pending = True  # mod_delayed_work(..., debounce)

    def run_work(self):
        if self.work_pending:
            self.work_pending = False
            state = self.chip.get_value(self.pin)
            if state != self.state:
                self.state = state
                self.events.append(("KEY_POWER", state))


def make():
    line = LevelLine()
    gpio = Pl061(line)
    chip = LinuxPl061(gpio)
    chip.probe()
    return gpio, line, chip


class Timers:
    def __init__(self):
        self.now = 0.0
        self.queue = []

    def clock(self):
        return self.now

    def call_later(self, delay, fn):
        self.queue.append((self.now + delay, fn))

    def advance(self, seconds):
        end = self.now + seconds
        while True:
            due = sorted((t, i) for i, (t, _) in enumerate(self.queue) if t <= end)
            if not due:
                break
            t, i = due[0]
            _, fn = self.queue.pop(i)
            self.now = t
            fn()
        self.now = end


def test_amba_ids():
    gpio, _, _ = make()
    pid = sum((gpio.read(0xFE0 + 4 * i, 4) & 255) << (8 * i) for i in range(4))
    cid = sum((gpio.read(0xFF0 + 4 * i, 4) & 255) << (8 * i) for i in range(4))
    assert cid == AMBA_CID and pid & 0x000FFFFF == 0x00041061  # gpio-pl061.c pl061_ids
    # QEMU hw/gpio/pl061.c pl061_id, from 0xFD0
    assert [gpio.read(off, 4) for off in range(0xFD0, 0x1000, 4)] == [
        0x00, 0x00, 0x00, 0x00, 0x61, 0x10, 0x04, 0x00, 0x0D, 0xF0, 0x05, 0xB1]


def test_reset_state():
    gpio, line, _ = make()
    for reg in (0x3FC, GPIODIR, GPIOIS, GPIOIBE, GPIOIEV, GPIOIE, GPIORIS, GPIOMIS, GPIOAFSEL):
        assert gpio.read(reg, 4) == 0, hex(reg)
    assert line.changes == []


def test_power_key_press_and_release_reach_gpio_keys():
    gpio, line, chip = make()
    keys = GpioKeys(chip, POWER_PIN)
    assert gpio.read(GPIOIS, 1) == 0 and gpio.read(GPIOIBE, 1) == bit(POWER_PIN)
    assert gpio.read(GPIOIE, 1) == bit(POWER_PIN) and not line.level
    gpio.set_input(POWER_PIN, True)
    assert line.level and gpio.read(GPIOMIS, 1) == bit(POWER_PIN)
    keys.interrupt()
    assert not line.level  # irq_ack cleared the latched edge
    keys.run_work()  # debounce expired: the pin is still high
    assert keys.events == [("KEY_POWER", 1)]
    gpio.set_input(POWER_PIN, False)
    assert line.level  # the falling edge too (IBE)
    keys.interrupt()
    keys.run_work()
    assert keys.events == [("KEY_POWER", 1), ("KEY_POWER", 0)]
    assert not line.level


def test_a_release_before_the_debounce_read_loses_the_press():
    # Why the key must be held: gpio-keys reads the level after its debounce delay, not at the edge.
    gpio, _, chip = make()
    keys = GpioKeys(chip, POWER_PIN)
    gpio.set_input(POWER_PIN, True)
    keys.interrupt()
    gpio.set_input(POWER_PIN, False)
    keys.interrupt()
    keys.run_work()
    assert keys.events == []


def test_press_power_key_holds_until_the_guest_has_read_the_pin():
    gpio, line, chip = make()
    keys = GpioKeys(chip, POWER_PIN)
    timers = Timers()
    press_power_key(gpio, timers.call_later, clock=timers.clock)
    assert line.level
    keys.interrupt()
    timers.advance(1.0)  # a slow guest: its debounce work has not run after a second
    assert gpio.read(GPIORIS, 1) == 0 and not line.level  # still pressed: no falling edge has been latched
    keys.run_work()
    assert keys.events == [("KEY_POWER", 1)]
    timers.advance(0.1)
    assert line.level  # released: the falling edge
    keys.interrupt()
    keys.run_work()
    assert keys.events == [("KEY_POWER", 1), ("KEY_POWER", 0)]
    assert not timers.queue


def test_press_power_key_releases_after_100ms_for_a_prompt_guest():
    gpio, _, chip = make()
    keys = GpioKeys(chip, POWER_PIN)
    timers = Timers()
    press_power_key(gpio, timers.call_later, clock=timers.clock)
    keys.interrupt()
    timers.advance(0.005)  # gpio-keys' default debounce-interval, 5 ms
    keys.run_work()
    timers.advance(0.094)
    assert gpio.read(bit(POWER_PIN + 2), 1)
    timers.advance(0.002)  # QEMU's gpio-key holds 100 ms
    assert not gpio.read(bit(POWER_PIN + 2), 1)


def test_press_power_key_gives_up_when_nothing_reads_the_pin():
    gpio, line, chip = make()
    timers = Timers()
    press_power_key(gpio, timers.call_later, clock=timers.clock)  # no driver: the interrupt stays masked
    assert not line.level
    # Observed without reading DATA (a read would count as the guest's): at reset IS, IBE and IEV are clear, so
    # the release latches a falling edge in RIS.
    timers.advance(9.9)
    assert gpio.read(GPIORIS, 1) == 0
    timers.advance(0.2)
    assert gpio.read(GPIORIS, 1) == bit(POWER_PIN) and not timers.queue
    assert gpio.read(0x3FC, 1) == 0


def test_single_edge_triggers():
    for trigger, fires_on in ((IRQ_TYPE_EDGE_RISING, True), (IRQ_TYPE_EDGE_FALLING, False)):
        gpio, line, chip = make()
        chip.direction_input(5)
        gpio.set_input(5, not fires_on)  # start from the level that does not trigger
        chip.irq_type(5, trigger)
        chip.irq_unmask(5)
        assert not line.level
        gpio.set_input(5, fires_on)  # the edge toward this level triggers
        assert line.level and gpio.read(GPIORIS, 1) == bit(5)
        chip.irq_ack(5)
        assert not line.level
        gpio.set_input(5, not fires_on)  # the other edge does not
        assert not line.level and gpio.read(GPIORIS, 1) == 0


def test_level_interrupts_follow_the_pin_and_ignore_ic():
    gpio, line, chip = make()
    chip.direction_input(1)
    chip.irq_type(1, IRQ_TYPE_LEVEL_HIGH)
    chip.irq_unmask(1)
    assert not line.level
    gpio.set_input(1, True)
    assert line.level
    chip.irq_ack(1)  # handle_level_irq's mask_ack: the level is still there
    assert line.level and gpio.read(GPIORIS, 1) == bit(1)
    gpio.set_input(1, False)
    assert not line.level and gpio.read(GPIORIS, 1) == 0
    chip.irq_type(1, IRQ_TYPE_LEVEL_LOW)  # the pin is low: active at once
    assert gpio.read(GPIORIS, 1) == bit(1) and line.level
    chip.irq_mask(1)
    assert not line.level and gpio.read(GPIOMIS, 1) == 0


def test_masked_edge_stays_latched_until_unmasked():
    gpio, line, chip = make()
    chip.direction_input(0)
    chip.irq_type(0, IRQ_TYPE_EDGE_BOTH)
    gpio.set_input(0, True)
    assert not line.level and gpio.read(GPIORIS, 1) == 1
    chip.irq_unmask(0)
    assert line.level


def test_data_is_address_masked_and_outputs_only():
    gpio, line, chip = make()
    chip.direction_output(5, 1)
    chip.direction_output(6, 0)
    assert gpio.read(GPIODIR, 1) == bit(5) | bit(6)
    assert chip.get_value(5) == 1 and chip.get_value(6) == 0
    assert gpio.read(0x3FC, 1) == bit(5)  # all eight pins
    assert gpio.read(bit(6 + 2), 1) == 0 and gpio.read(bit(5 + 2), 1) == bit(5)
    gpio.write(bit(6 + 2), 1, 0xFF)  # only pin 6 is in the address mask
    assert gpio.read(0x3FC, 1) == bit(5) | bit(6)
    gpio.write(0x3FC, 1, 0)  # all pins in the mask; input pins keep nothing
    assert gpio.read(0x3FC, 1) == 0
    chip.set_value(5, 1)
    gpio.set_input(2, True)  # an input pin reads its host level
    gpio.set_input(5, False)  # an output pin reads its latch, not the host
    assert gpio.read(0x3FC, 1) == bit(5) | bit(2)
    assert gpio.read(bit(2 + 2) | bit(5 + 2), 4) == bit(5) | bit(2)
    assert line.changes == []


def test_host_levels_on_output_pins_raise_no_edge():
    gpio, line, chip = make()
    chip.irq_type(4, IRQ_TYPE_EDGE_BOTH)
    chip.irq_unmask(4)
    chip.direction_output(4, 0)
    gpio.set_input(4, True)
    assert not line.level and gpio.read(GPIORIS, 1) == 0
    chip.direction_input(4)  # now the host's level shows, and a direction change raises nothing
    assert chip.get_value(4) == 1 and not line.level


def test_set_input_refuses_pins_that_do_not_exist():
    gpio, _, _ = make()
    for pin in (-1, 8, 100):
        with pytest.raises(ValueError):
            gpio.set_input(pin, True)


def test_unknown_offsets_sizes_and_read_only_registers():
    gpio, line, chip = make()
    chip.direction_output(7, 1)
    chip.irq_type(7, IRQ_TYPE_EDGE_RISING)
    gpio.write(GPIOAFSEL, 4, 0x1FF)
    before = [gpio.read(reg, 4) for reg in (0x3FC, GPIODIR, GPIOIS, GPIOIBE, GPIOIEV, GPIOIE, GPIORIS, GPIOAFSEL)]
    assert before[-1] == 0xFF
    for off in (0x424, 0x500, 0x520, 0x800, 0xFD0, 0xFDC, 0x1000, -4):
        assert gpio.read(off, 4) == 0, hex(off)
        gpio.write(off, 4, 0xFFFFFFFF)
    assert gpio.read(GPIOIC, 4) == 0  # write-only
    for reg in (GPIORIS, GPIOMIS, 0xFE0, 0xFF0):
        gpio.write(reg, 4, 0xFF)
    gpio.write(GPIODIR + 1, 1, 0)  # not the register's own byte lane: ignored
    gpio.write(GPIODIR, 8, 0)  # wider than the APB word: ignored
    gpio.write(GPIODIR, 3, 0)
    assert gpio.read(GPIODIR, 8) == 0 and gpio.read(GPIODIR + 1, 1) == 0 and gpio.read(GPIODIR + 2, 4) == 0
    after = [gpio.read(reg, 4) for reg in (0x3FC, GPIODIR, GPIOIS, GPIOIBE, GPIOIEV, GPIOIE, GPIORIS, GPIOAFSEL)]
    assert after == before and line.changes == []
    gpio.write(GPIODIR, 2, 0xFF00)  # a halfword write at the register's offset: zero-extended, 8 bits kept
    assert gpio.read(GPIODIR, 4) == 0


ops = st.one_of(hostile_accesses([0x3FC, 0x020, GPIODIR, GPIOIS, GPIOIBE, GPIOIEV, GPIOIE, GPIORIS, GPIOMIS, GPIOIC]),
                st.tuples(st.just("pin"), st.integers(0, 7), st.booleans()))


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=80))
def test_no_access_sequence_raises_and_the_line_follows_mis(seq):
    gpio, line, _ = make()
    for op in seq:
        if not access(gpio, op):
            gpio.set_input(op[1], op[2])
        assert line.level == bool(gpio.read(GPIOMIS, 4))
        assert gpio.read(GPIOMIS, 4) == gpio.read(GPIORIS, 4) & gpio.read(GPIOIE, 4)
