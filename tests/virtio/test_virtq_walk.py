"""The C descriptor chain walk (kvm/virtq.c behind Virtqueue.pop) against the reference walk in Python
(reference_walk.py): random descriptor tables, loops, indirect tables, buffers anywhere; the same outcome, kind
and segments every time."""
import struct

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cloudkvm.devices.virtio.queue import BadChain, Virtqueue
from cloudkvm.kvm.memory import GuestMemory
from reference_walk import reference_walk

MiB = 1 << 20
LOW_END, HIGH, HIGH_END = MiB, 2 * MiB, 3 * MiB   # RAM [0, 1 MiB) and [2 MiB, 3 MiB)
DESC, AVAIL, USED = 0x1000, 0x9000, 0xA000
INDIRECT_TABLES = [0x20000, 0x21000, LOW_END - 64, HIGH_END - 32]
ADDRESSES = [0x40000, 0x40010, LOW_END - 16, LOW_END - 1, LOW_END, HIGH - 16, HIGH, HIGH_END - 1, HIGH_END,
             1 << 32, 2**64 - 16, *INDIRECT_TABLES]
LENGTHS = [0, 1, 16, 32, 48, 64, 128, 512, 4096, 0x10000, 2**31, 2**32 - 1]

in_ram = st.integers(0x40000, 0x48000)  # mostly buffers inside RAM, so a chain gets far enough for every check
addresses = in_ram | in_ram | st.sampled_from(ADDRESSES) | st.integers(0, 2**64 - 1)
lengths = st.integers(0, 4096) | st.integers(0, 4096) | st.sampled_from(LENGTHS) | st.integers(0, 2**32 - 1)
plain = st.sampled_from([1, 1, 3, 3, 0, 2])  # NEXT and WRITE mostly, so chains grow and mix directions
flags = plain | plain | plain | st.sampled_from([4, 5, 6, 7]) | st.integers(0, 0xFFFF)


def assert_walks_agree(memory, size: int, indirect_ok: bool, head: int) -> None:
    """The C walk of the chain at `head` (a queue of `size` at DESC) has the reference walk's outcome."""
    queue = Virtqueue(memory, 64)
    queue.size, queue.desc_table, queue.avail_ring, queue.used_ring = size, DESC, AVAIL, USED
    queue.indirect = indirect_ok
    queue.activate()
    expected = reference_walk(memory, DESC, size, indirect_ok, head)
    try:
        chain = queue._walk(head)
        got = ("ok", [tuple(s) for s in chain.segments])
    except BadChain as e:
        got = ("problem", e.kind, [tuple(s) for s in e.segments]) if e.segments is not None else ("error", e.kind)
    event(str(expected[:2]) if expected[0] != "ok" else "ok")
    assert got == expected


def descriptor(entries: int):
    return st.tuples(addresses, lengths, flags, st.integers(0, entries - 1) | st.integers(0, entries - 1)
                     | st.integers(0, 0xFFFF))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), size=st.sampled_from([1, 2, 4, 8, 16, 64]), indirect_ok=st.booleans())
def test_the_c_walk_agrees_with_the_reference_walk(data, size, indirect_ok):
    memory = GuestMemory([(0, LOW_END), (HIGH, HIGH_END - HIGH)])
    try:
        for i, d in enumerate(data.draw(st.lists(descriptor(size), min_size=size, max_size=size))):
            memory.write(DESC + 16 * i, struct.pack("<QIHH", *d))
        for table in INDIRECT_TABLES[:2]:
            for i, d in enumerate(data.draw(st.lists(descriptor(8), min_size=8, max_size=8))):
                memory.write(table + 16 * i, struct.pack("<QIHH", *d))
        assert_walks_agree(memory, size, indirect_ok, data.draw(st.integers(0, size - 1)))
    finally:
        memory.close()


@st.composite
def planned_chain(draw, entries: int, limit: int):
    """A chain along distinct descriptors (a path through a table of `entries`), device-readable then
    device-writable, each link then perhaps broken: a flag flipped, a next pointing back (a loop) or out of the
    table, a buffer moved out of RAM. Descriptors as (index, (addr, len, flags, next))."""
    path = draw(st.permutations(range(entries)))[:draw(st.integers(1, min(entries, limit)))]
    switch = draw(st.integers(0, len(path)))
    out = []
    for n, idx in enumerate(path):
        last = n == len(path) - 1
        flags = (2 if n >= switch else 0) | (0 if last else 1)
        desc = [draw(in_ram), draw(st.integers(0, 4096) | st.sampled_from(LENGTHS)), flags,
                0 if last else path[n + 1]]
        broken = draw(st.sampled_from(["none"] * 6 + ["flag", "back", "out", "ram"]))
        if broken == "flag":
            desc[2] ^= draw(st.sampled_from([1, 2, 4]))
        elif broken == "back":
            desc[2] |= 1
            desc[3] = path[draw(st.integers(0, n))]
        elif broken == "out":
            desc[2] |= 1
            desc[3] = draw(st.integers(entries, 0xFFFF))
        elif broken == "ram":
            desc[0] = draw(st.sampled_from(ADDRESSES))
        out.append((idx, tuple(desc)))
    return out


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), size=st.sampled_from([1, 2, 4, 8, 16, 64]), indirect_ok=st.booleans())
def test_the_c_walk_agrees_with_the_reference_on_planned_chains(data, size, indirect_ok):
    """Chains built as drivers build them, some links broken, some through an indirect table (whose naming
    descriptor may be wrong too), so that every check is reached, not only the first ones."""
    memory = GuestMemory([(0, LOW_END), (HIGH, HIGH_END - HIGH)])
    table = INDIRECT_TABLES[0]
    try:
        main = data.draw(planned_chain(size, size + 1))
        if data.draw(st.booleans()):  # the chain ends in an indirect table
            inner = data.draw(planned_chain(16, 16))
            for idx, d in inner:
                memory.write(table + 16 * idx, struct.pack("<QIHH", *d))
            length = data.draw(st.sampled_from([16 * 16, 16 * 16, 16 * 8, 16 * 3, 0, 24, 1 << 20]))
            naming = data.draw(st.sampled_from([4, 4, 4, 5, 6]))
            idx, _ = main[-1]
            main[-1] = (idx, (table, length, naming, 0))
        for idx, d in main:
            memory.write(DESC + 16 * idx, struct.pack("<QIHH", *d))
        assert_walks_agree(memory, size, indirect_ok, main[0][0])
    finally:
        memory.close()


def test_a_loop_and_a_chain_longer_than_the_queue_are_told_apart():
    """A 4-entry queue whose head names an indirect table of 8: chained straight through it is too long (more than 4
    descriptors); 0 -> 1 -> 2 -> 1 is a loop at descriptor 1 (each found before the other could be)."""
    memory = GuestMemory([(0, LOW_END)])
    table = INDIRECT_TABLES[0]
    try:
        queue = Virtqueue(memory, 4)
        queue.size, queue.desc_table, queue.avail_ring, queue.used_ring = 4, DESC, AVAIL, USED
        queue.indirect = True
        queue.activate()
        memory.write(DESC, struct.pack("<QIHH", table, 8 * 16, 4, 0))
        for nexts, kind, reason in (([1, 2, 3, 4, 5, 6, 7], "too-long", "more than 4 descriptors"),
                                    ([1, 2, 1], "loop", "descriptor 1 is visited twice")):
            for i, nxt in enumerate(nexts):
                memory.write(table + 16 * i, struct.pack("<QIHH", 0x40000, 16, 1, nxt))
            assert reference_walk(memory, DESC, 4, True, 0) == ("error", kind)
            try:
                queue._walk(0)
            except BadChain as e:
                assert e.kind == kind and reason in e.reason, e
            else:
                raise AssertionError("no error")
    finally:
        memory.close()


def test_a_size_beyond_the_scratch_is_refused_before_the_c_walk():
    from cloudkvm.devices.virtio.queue import BadQueue
    memory = GuestMemory([(0, LOW_END)])
    try:
        queue = Virtqueue(memory, 4)
        queue.size, queue.desc_table, queue.avail_ring, queue.used_ring = 4, DESC, AVAIL, USED
        queue.activate()
        queue.size = 8  # changed behind the transport's back: the walk's arrays hold 4 segments
        try:
            queue._walk(0)
        except BadQueue as e:
            assert e.kind == "size"
        else:
            raise AssertionError("no error")
    finally:
        memory.close()


def test_after_close_the_c_walk_reads_nothing():
    memory = GuestMemory([(0, LOW_END)])
    queue = Virtqueue(memory, 4)
    queue.size, queue.desc_table, queue.avail_ring, queue.used_ring = 4, DESC, AVAIL, USED
    queue.activate()
    memory.write(DESC, struct.pack("<QIHH", 0x40000, 16, 0, 0))
    assert queue._walk(0).segments == [(0x40000, 16, False)]
    memory.close()
    try:
        queue._walk(0)
    except BadChain as e:
        assert e.kind == "outside-ram" and "descriptor table" in e.reason
    else:
        raise AssertionError("the walk read unmapped memory")
