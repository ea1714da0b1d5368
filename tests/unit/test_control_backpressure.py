"""The control socket never waits for a client: a real ControlServer on a real Unix socket, served by a real
IoThread, in front of a minimal fake machine (console, serial input, power button, end)."""
import errno
import json
import logging
import re
import socket
import threading
import time

import pytest

from cloudkvm.console import ConsoleLog
from cloudkvm.control import ControlServer, request
from cloudkvm.iothread import IoThread
from waits import wait_for

WAIT = 10.0      # generous upper bound for cross-thread events; normally milliseconds
PROMPT = 1.0     # how long a `status` may take while another client misbehaves (normally ~1 ms)
STATUS = b'{"cmd": "status"}\n'


class FakeBoard:
    def __init__(self):
        self.serial = bytearray()

    def serial_input(self, data: bytes) -> int:
        self.serial += data
        return len(data)


class FakeMachine:
    """What ControlServer uses of a Machine."""

    def __init__(self, io: IoThread, console: ConsoleLog):
        self.io, self.console, self.board = io, console, FakeBoard()
        self.shutdowns, self.ended = 0, []

    def request_shutdown(self) -> bool:
        self.shutdowns += 1
        return True

    def end(self, result) -> None:
        self.ended.append(result)


@pytest.fixture
def vmm(tmp_path):
    io = IoThread(name="test-io")
    log_path = tmp_path / "console.log"
    log_file = open(log_path, "wb")
    machine = FakeMachine(io, ConsoleLog(log_file.fileno()))
    server = ControlServer(machine, tmp_path / "control.sock", {"name": "fake"})
    io.start()
    yield machine, server, tmp_path / "control.sock", log_path
    server.close()
    io.stop()
    log_file.close()


def connect(path, timeout=WAIT) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))  # blocking: waits for room in the listen backlog
    sock.settimeout(timeout)
    return sock


def read_line(sock) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return json.loads(data)


def read_to_eof(sock) -> bytes:
    """Everything until the server closed the connection (end of file, or ECONNRESET: Linux reports a close
    with our requests still unread that way, once the data it had sent is read)."""
    data = b""
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def attach_console(path) -> socket.socket:
    sock = connect(path)
    sock.sendall(b'{"cmd": "console"}\n')
    return sock


def open_connections(server) -> int:
    return server.machine.io.run_sync(lambda: len(server.clients))


def wait_until(predicate, timeout=WAIT) -> bool:
    return wait_for(predicate, timeout, interval=0.01)


def timed_status(path) -> float:
    begun = time.monotonic()
    reply = request(path, "status", timeout=5)
    took = time.monotonic() - begun
    assert reply["ok"] and reply["name"] == "fake"
    return took


# --- requests ---------------------------------------------------------------------------------------------

def test_requests_pipelined_in_one_write_are_all_answered_in_order(vmm):
    machine, _, path, _ = vmm
    with connect(path) as sock:
        sock.sendall(STATUS + b'{"cmd": "nonsense"}\n' + b"not json\n" + b'{"cmd": "shutdown"}\n')
        first, second, third, fourth = (read_line(sock) for _ in range(4))
    assert first["ok"] is True and first["state"] == "running"
    assert second == {"ok": False, "error": "unknown command 'nonsense'"}
    assert third["ok"] is False and "bad request" in third["error"]
    assert fourth == {"ok": True} and machine.shutdowns == 1


def test_a_client_that_pipelines_and_never_reads_is_dropped_and_others_stay_served(vmm, caplog):
    caplog.set_level(logging.WARNING, logger="cloudkvm.control")
    _, server, path, _ = vmm
    hog = connect(path, timeout=1)
    outcome = []

    def pipeline():
        """Thousands of requests in one write, then one request per write (each arrives on its own) until the
        server hangs up; never reads a reply."""
        try:
            hog.sendall(STATUS * 3000)
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                hog.sendall(STATUS)
                time.sleep(0.0005)
            outcome.append("still connected")
        except OSError as exc:
            outcome.append(exc)
    sender = threading.Thread(target=pipeline)
    sender.start()
    try:
        latencies = []
        for _ in range(3):  # while the hog floods the server
            latencies.append(timed_status(path))
            time.sleep(0.05)
        sender.join(WAIT + 5)
        assert not sender.is_alive()
        for _ in range(3):  # once it is done (dropped, or stuck because nothing reads its requests any more)
            latencies.append(timed_status(path))
        assert max(latencies) < PROMPT, latencies
        assert len(outcome) == 1 and isinstance(outcome[0], (BrokenPipeError, ConnectionResetError)), outcome
        hog.settimeout(WAIT)
        replies = read_to_eof(hog)  # what the kernel held for it, then end of file: the server closed it
        assert replies.count(b"\n") >= 1 and b'"ok": true' in replies
        assert wait_until(lambda: open_connections(server) == 0)
        drops = [r for r in caplog.records if r.name == "cloudkvm.control" and "dropped" in r.getMessage()]
        assert len(drops) == 1, [r.getMessage() for r in drops]
        assert "pid" in drops[0].getMessage() and "unread" in drops[0].getMessage()
    finally:
        hog.close()
        sender.join(WAIT)


def test_a_client_that_pipelines_a_few_hundred_requests_before_reading_is_not_dropped(vmm):
    _, _, path, _ = vmm
    with connect(path) as sock:
        sock.sendall(STATUS * 300)  # ~45 KiB of replies: within what the socket and the output buffer hold
        time.sleep(0.2)              # all answered before this client reads a byte
        data = b""
        while data.count(b"\n") < 300:
            chunk = sock.recv(1 << 16)
            assert chunk, f"dropped after {len(data.splitlines())} replies"
            data += chunk
        assert all(json.loads(line)["ok"] for line in data.splitlines())
        assert timed_status(path) < PROMPT


def test_a_client_that_shuts_its_side_down_still_gets_every_reply(vmm):
    _, server, path, _ = vmm
    with connect(path) as sock:
        sock.sendall(STATUS * 500)   # more replies than the socket itself holds: some wait in the server
        sock.shutdown(socket.SHUT_WR)  # as `socat` or `nc -N` do after their input
        time.sleep(0.3)
        replies = read_to_eof(sock).splitlines()
    assert len(replies) == 500 and all(json.loads(line)["ok"] for line in replies)
    assert wait_until(lambda: open_connections(server) == 0)


def test_a_request_line_over_the_limit_gets_an_error_and_the_connection_closes(vmm):
    _, server, path, _ = vmm
    with connect(path) as sock:
        try:
            sock.sendall(b"x" * 100_000)  # no newline, ever
        except (BrokenPipeError, ConnectionResetError):
            pass                          # closed before it all went out
        reply = read_to_eof(sock)
    answer = json.loads(reply.splitlines()[0])
    assert answer["ok"] is False and answer["error"].startswith("request too long")
    assert wait_until(lambda: open_connections(server) == 0)
    assert timed_status(path) < PROMPT


def test_connections_beyond_the_limit_are_refused_with_one_reply_line(vmm, caplog):
    caplog.set_level(logging.WARNING, logger="cloudkvm.control")
    _, server, path, _ = vmm
    idle = [connect(path) for _ in range(16)]
    try:
        for sock in idle:  # each one accepted and served, and left open
            sock.sendall(STATUS)
            assert read_line(sock)["ok"]
        for _ in range(2):
            with connect(path) as extra:
                reply = read_to_eof(extra)
            assert json.loads(reply) == {"ok": False, "error": "too many connections (at most 16)"}
        refusals = [r for r in caplog.records if "refusing" in r.getMessage()]
        assert len(refusals) == 1  # logged once, not once per refused connection
        idle.pop().close()
        assert wait_until(lambda: open_connections(server) == 15)
        assert timed_status(path) < PROMPT  # a slot is free again
    finally:
        for sock in idle:
            sock.close()


def test_stop_replies_then_ends_the_vm(vmm):
    machine, _, path, _ = vmm
    assert request(path, "stop") == {"ok": True}
    assert wait_until(lambda: len(machine.ended) == 1)  # the reply goes out first
    assert [r.reason for r in machine.ended] == ["stopped"]


# --- the console stream ---------------------------------------------------------------------------------------

def numbered_output(lines: int) -> list[bytes]:
    return [b"line %06d %s\n" % (i, b"." * 1000) for i in range(lines)] + [b"END\n"]


def test_a_console_client_that_never_reads_holds_up_neither_the_guest_nor_others(vmm, caplog):
    caplog.set_level(logging.WARNING, logger="cloudkvm.control")
    machine, server, path, log_path = vmm
    lazy = attach_console(path)   # never reads while the guest writes
    eager = attach_console(path)
    try:
        assert read_line(eager) == {"ok": True}
        assert wait_until(lambda: len(machine.console._listeners) == 2)  # both attached
        received = bytearray()

        def read_eager():
            while not received.endswith(b"END\n"):
                chunk = eager.recv(1 << 16)
                if not chunk:
                    return
                received.extend(chunk)
        reader = threading.Thread(target=read_eager)
        reader.start()
        chunks = numbered_output(4000)  # ~4 MiB, far beyond what the lazy client's socket and buffer hold
        slowest, begun = 0.0, time.monotonic()
        for chunk in chunks:             # as a vCPU thread writes guest output
            t = time.monotonic()
            machine.console.write(chunk)
            slowest = max(slowest, time.monotonic() - t)
        wrote = time.monotonic() - begun
        reader.join(WAIT)
        assert not reader.is_alive(), f"the reading client got {len(received)} bytes, not the end"
        assert slowest < 0.2 and wrote < 5, (slowest, wrote)
        assert log_path.read_bytes() == b"".join(chunks)  # the console log misses nothing
        numbers = [int(n) for n in re.findall(rb"line (\d{6}) \.{1000}\n", bytes(received))]
        assert numbers == sorted(set(numbers)) and received.endswith(b"END\n")
        lazy.settimeout(WAIT)             # it comes back: it gets the newest output, the end included
        late = bytearray()
        while not late.endswith(b"END\n"):
            chunk = lazy.recv(1 << 16)
            assert chunk, f"the lazy client was closed after {len(late)} bytes"
            late.extend(chunk)
        assert late.startswith(b'{"ok": true}\n')
        assert len(late) < len(b"".join(chunks))  # it lost its oldest unread output, not its connection
        assert len(late) < (1 << 20)              # what waited for it was bounded (socket + CONSOLE_BACKLOG)
        warnings = [r.getMessage() for r in caplog.records if "not reading the console" in r.getMessage()]
        assert warnings and len(set(warnings)) == len(warnings), warnings  # once per client (the eager one may
                                                                           # fall behind too)
    finally:
        lazy.close()
        eager.close()


def test_console_input_reaches_the_guest_including_bytes_sent_with_the_request(vmm):
    machine, server, path, _ = vmm
    with connect(path) as sock:
        sock.sendall(b'{"cmd": "console"}\nroot\n')
        assert read_line(sock) == {"ok": True}
        sock.sendall(b"ls -l\n")
        assert wait_until(lambda: bytes(machine.board.serial) == b"root\nls -l\n"), bytes(machine.board.serial)
        machine.console.write(b"# ")
        assert sock.recv(100) == b"# "
    assert wait_until(lambda: machine.console._listeners == [])  # gone with its connection


def test_closing_the_server_closes_every_connection(vmm):
    _, server, path, _ = vmm
    a, b = connect(path), attach_console(path)
    try:
        a.sendall(STATUS)
        assert read_line(a)["ok"] and read_line(b) == {"ok": True}
        server.close()
        assert read_to_eof(a) == b"" and read_to_eof(b) == b""
        assert not path.exists()
    finally:
        a.close()
        b.close()


# --- hostile requests and resource exhaustion ---------------------------------------------------------------
def test_a_request_nested_thousands_deep_gets_an_error_and_the_connection_stays_usable(vmm):
    _, server, path, _ = vmm
    with connect(path) as sock:
        sock.sendall(b"[" * 4000 + b"\n")  # fits in a request line; json.loads raises RecursionError
        assert read_line(sock) == {"ok": False, "error": "bad request: want a JSON object with 'cmd'"}
        sock.sendall(STATUS)
        assert read_line(sock)["ok"] is True
    assert wait_until(lambda: open_connections(server) == 0)


def test_a_request_that_fails_inside_the_server_costs_its_connection_not_its_slot(vmm, caplog):
    machine, server, path, _ = vmm

    def broken_power_button():
        raise RuntimeError("a bug in the board")
    machine.request_shutdown = broken_power_button
    for _ in range(20):  # more than MAX_CONNECTIONS: a slot leaked per failure would refuse the last ones
        with connect(path) as sock:
            sock.sendall(b'{"cmd": "shutdown"}\n')
            assert read_to_eof(sock) == b""  # closed, not left hanging
    assert wait_until(lambda: open_connections(server) == 0)
    assert timed_status(path) < PROMPT
    assert any("a bug in the board" in (r.exc_text or "") or r.exc_info for r in caplog.records)


class OutOfDescriptors:
    """A listening socket whose accept() fails with EMFILE while `failing`, counting the calls."""

    def __init__(self, real: socket.socket):
        self.real, self.failing, self.calls = real, True, 0

    def accept(self):
        self.calls += 1
        if self.failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.real.accept()

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_running_out_of_descriptors_pauses_the_listener_instead_of_spinning(vmm, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="cloudkvm.control")
    monkeypatch.setattr("cloudkvm.control.ACCEPT_PAUSE", 0.3)
    _, server, path, _ = vmm
    listener = OutOfDescriptors(server.sock)
    server.machine.io.run_sync(lambda: setattr(server, "sock", listener))
    with connect(path) as sock:  # queued in the backlog; the listener stays readable while accept fails
        time.sleep(1.0)
        assert listener.calls <= 5  # about one try per pause; a spinning loop makes thousands
        assert [r.getMessage() for r in caplog.records if "cannot accept" in r.getMessage()] == [
            "control socket: cannot accept connections (Too many open files); retrying every 0.3 s"]
        listener.failing = False  # descriptors are free again: the waiting client is served
        sock.sendall(STATUS)
        assert read_line(sock)["ok"] is True
    server.machine.io.run_sync(lambda: setattr(server, "sock", listener.real))
