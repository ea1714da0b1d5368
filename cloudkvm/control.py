"""The control socket: a Unix socket (mode 0600) in the instance folder, one JSON request per line.

Requests: {"cmd": "status"} → {"ok": true, ...}; {"cmd": "shutdown"} asks the guest to power off (ACPI power
button); {"cmd": "stop"} ends the VM now; {"cmd": "console"} turns the connection into the raw serial stream
(guest output to the client, client bytes to the guest's UART). Requests may be pipelined: every complete line
is answered, in order.

The server runs on the machine's I/O thread, which also serves disks, network and console input, so it never
waits for a client. Every byte for a client goes through that connection's output buffer: written at once when
the socket takes it, otherwise when poll() says the socket is writable; nothing blocks and nothing sleeps.
- A request client may leave at most MAX_UNREAD_REPLIES bytes of replies unread (beyond what the kernel's
  socket buffer holds). One that passes it keeps sending requests while reading no replies: it is dropped
  (closed) and the drop logged once.
- A console client that stops reading loses its *oldest* output, not its connection: the buffer keeps the
  newest CONSOLE_BACKLOG bytes (cut at a line start) and the first loss is logged. A console is a person's
  terminal; a pause (a suspended `cloudkvm console`, a slow ssh link) should not end the session, and what that
  person wants on return is the newest output (the current prompt) — the same choice as the console log's tail.
  Guest output is queued by the vCPU thread under the connection's lock and never waits for a client.
- At most MAX_CONNECTIONS connections are open at once; one more is told so in one reply line and closed.
- A request line may be at most MAX_REQUEST bytes; a longer one gets an error reply and the connection is
  closed, so at most MAX_REQUEST + RECV_CHUNK bytes of a client's input are ever buffered."""
import errno
import functools
import itertools
import json
import logging
import os
import socket
import struct
import threading
import time

log = logging.getLogger("cloudkvm.control")
MAX_REQUEST = 4096            # bytes in one request line
RECV_CHUNK = 4096             # bytes read from a client per turn of the I/O loop
MAX_UNREAD_REPLIES = 64 << 10  # replies a request client may leave unread before it is dropped
CONSOLE_BACKLOG = 64 << 10    # newest console bytes kept for a console client that is not reading
MAX_CONNECTIONS = 16
LISTEN_BACKLOG = 8
ACCEPT_PAUSE = 1.0            # seconds the listener rests when the process is out of file descriptors
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _peer(sock: socket.socket, number: int) -> str:
    """Which connection this is and who made it (the connecting process, from SO_PEERCRED), for log lines."""
    creds = struct.Struct("3i")  # struct ucred: pid, uid, gid
    try:
        pid, _, _ = creds.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, creds.size))
    except OSError:
        return f"client #{number}"
    return f"client #{number} (pid {pid})"


class _Client:
    """One accepted connection: its unfinished request line and the output it has not taken yet."""

    def __init__(self, sock: socket.socket, number: int):
        self.sock = sock
        self.fd = sock.fileno()
        self.who = _peer(sock, number)
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.lock = threading.Lock()  # the outbox is also filled from vCPU threads (console output)
        self.waiting = False          # the outbox is non-empty and a writer callback is (being) registered
        self.console = False
        self.closed = False
        self.broken = False           # a send failed: the client is gone
        self.ending = False           # it sent its last byte: close once its replies are out
        self.trimmed = 0              # console bytes it lost unread (oldest first)
        self.listener = None


class ControlServer:
    """Serves the control socket from the machine's I/O thread."""

    def __init__(self, machine, path, info: dict):
        self.machine = machine
        self.io = machine.io
        self.path = str(path)
        self.info = info
        self.started = time.time()
        self.clients: dict[int, _Client] = {}
        self._numbers = itertools.count(1)
        self._refusing = False
        self._accept_paused = False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self.sock.listen(LISTEN_BACKLOG)
        self.io.add_reader(self.sock.fileno(), self._accept)

    # --- connections (I/O thread) -----------------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(LISTEN_BACKLOG):
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
                    self._pause_accepting(exc)
                else:
                    log.warning("control socket: cannot accept a connection: %s", exc.strerror or exc)
                return
            sock.setblocking(False)
            if len(self.clients) >= MAX_CONNECTIONS:
                self._refuse(sock)
                continue
            client = _Client(sock, next(self._numbers))
            self.clients[client.fd] = client
            self.io.add_reader(client.fd, functools.partial(self._readable, client))

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of file descriptors: the pending connection stays in the backlog and the listener stays readable,
        so watching it would spin the I/O thread. Stop watching it for ACCEPT_PAUSE seconds, then try again."""
        if not self._accept_paused:
            log.warning("control socket: cannot accept connections (%s); retrying every %g s",
                        exc.strerror or exc, ACCEPT_PAUSE)
            self._accept_paused = True
        self.io.remove_reader(self.sock.fileno())
        self.io.call_later(ACCEPT_PAUSE, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self.sock.fileno() >= 0:  # not closed meanwhile
            self.io.add_reader(self.sock.fileno(), self._accept)

    def _refuse(self, sock: socket.socket) -> None:
        if not self._refusing:  # logged once until a connection closes
            log.warning("control socket: %d connections are open; refusing more", MAX_CONNECTIONS)
            self._refusing = True
        try:
            sock.send(json.dumps({"ok": False, "error": f"too many connections (at most {MAX_CONNECTIONS})"})
                      .encode() + b"\n")
        except OSError:
            pass
        sock.close()

    def _readable(self, client: _Client) -> None:
        try:
            self._serve(client)
        except Exception:  # a bug must cost this connection, never its slot or the I/O thread's reader table
            log.exception("control socket: serving %s failed; closing it", client.who)
            self._close(client)

    def _serve(self, client: _Client) -> None:
        try:
            data = client.sock.recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._end_of_input(client)
            return
        if client.console:
            self.machine.board.serial_input(data)
            return
        inbox = client.inbox
        inbox += data
        pos = 0
        while not client.closed and not client.console:
            end = inbox.find(b"\n", pos)
            if end < 0:
                break
            line, pos = bytes(inbox[pos:end]), end + 1
            if len(line) > MAX_REQUEST:
                self._finish(client, f"request too long (over {MAX_REQUEST} bytes)")
                return
            self._handle(client, line)
        if client.closed:
            return
        del inbox[:pos]
        if client.console:
            if inbox:  # bytes sent right after the console request are console input
                self.machine.board.serial_input(bytes(inbox))
                inbox.clear()
        elif len(inbox) > MAX_REQUEST:
            self._finish(client, f"request too long (over {MAX_REQUEST} bytes without a newline)")

    def _end_of_input(self, client: _Client) -> None:
        """The client sent all it will (closed, or shut its writing side down): close now, or once the replies
        still queued for it are out."""
        with client.lock:
            pending = bool(client.outbox) and not client.console
            client.ending = pending
        if pending:
            self.io.remove_reader(client.fd)
        else:
            self._close(client)

    def _handle(self, client: _Client, line: bytes) -> None:
        try:
            request = json.loads(line)
            cmd = request["cmd"]
        except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: '[' nested thousands deep
            self._reply(client, {"ok": False, "error": "bad request: want a JSON object with 'cmd'"})
            return
        if cmd == "status":
            self._reply(client, {"ok": True, "state": "running", "pid": os.getpid(),
                                 "uptime": time.time() - self.started, **self.info})
        elif cmd == "shutdown":
            sent = self.machine.request_shutdown()
            self._reply(client, {"ok": sent, **({} if sent else {"error": "this board has no power button"})})
        elif cmd == "stop":
            self._reply(client, {"ok": True})
            from .vcpu_loop import VmResult  # noqa: PLC0415  (avoid a cycle at import time)
            self.machine.end(VmResult("stopped", "stopped through the control socket"))
        elif cmd == "console":
            self._reply(client, {"ok": True})
            if not client.closed:
                self._attach(client)
        else:
            self._reply(client, {"ok": False, "error": f"unknown command {str(cmd)[:64]!r}"})

    def _reply(self, client: _Client, obj: dict) -> None:
        self._queue(client, json.dumps(obj).encode() + b"\n")
        if not client.closed and len(client.outbox) > MAX_UNREAD_REPLIES:
            self._drop(client, f"it left over {MAX_UNREAD_REPLIES >> 10} KiB of replies unread while sending "
                               "more requests")

    def _finish(self, client: _Client, error: str) -> None:
        """A last reply (what the socket takes at once), then close."""
        self._queue(client, json.dumps({"ok": False, "error": error}).encode() + b"\n")
        self._close(client)

    def _attach(self, client: _Client) -> None:
        """Stream guest output to the client; its bytes go to the guest's serial input."""
        client.console = True
        client.listener = functools.partial(self._console_output, client)
        self.machine.console.add_listener(client.listener)

    def _drop(self, client: _Client, why: str) -> None:
        log.warning("control socket: dropped %s: %s", client.who, why)
        self._close(client)

    def _close(self, client: _Client) -> None:
        with client.lock:
            if client.closed:
                return
            client.closed = True
        if client.listener is not None:
            self.machine.console.remove_listener(client.listener)
        self.io.remove_reader(client.fd)
        self.io.remove_writer(client.fd)
        client.sock.close()
        self.clients.pop(client.fd, None)
        self._refusing = False

    # --- output (any thread) -----------------------------------------------------------------------------------
    def _console_output(self, client: _Client, data: bytes) -> None:
        """ConsoleLog listener (a vCPU thread): queue guest output, keeping only the newest CONSOLE_BACKLOG bytes."""
        self._queue(client, data, keep_newest=CONSOLE_BACKLOG)

    def _queue(self, client: _Client, data: bytes, keep_newest: int | None = None) -> None:
        """Send `data` now if nothing is pending and the socket takes it; queue what it does not take."""
        watch = False
        with client.lock:
            if client.closed or client.broken:
                return
            if not client.waiting:
                data = data[self._send(client, data):]
                if data and not client.broken:
                    client.waiting = watch = True
            client.outbox += data
            if keep_newest is not None and len(client.outbox) > keep_newest:
                self._trim(client, len(client.outbox) - keep_newest)
            broken = client.broken
        if broken:
            self.io.now_or_soon(lambda: self._close(client))
        elif watch:
            self.io.now_or_soon(lambda: self._watch_writable(client))

    @staticmethod
    def _trim(client: _Client, excess: int) -> None:
        """Drop at least `excess` of the oldest pending bytes, up to the next line start (lock held)."""
        cut = client.outbox.find(b"\n", excess - 1, excess + 4096)
        cut = excess if cut < 0 else cut + 1
        del client.outbox[:cut]
        if not client.trimmed:
            log.warning("control socket: %s is not reading the console; dropping its oldest output", client.who)
        client.trimmed += cut

    @staticmethod
    def _send(client: _Client, data) -> int:
        """One non-blocking send (lock held); how much the socket took. A failed send marks the client broken."""
        try:
            return client.sock.send(data, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            client.broken = True
            return 0

    def _watch_writable(self, client: _Client) -> None:
        if not client.closed:
            self.io.add_writer(client.fd, functools.partial(self._writable, client))

    def _writable(self, client: _Client) -> None:
        with client.lock:
            if client.closed:
                return
            with memoryview(client.outbox) as pending:
                sent = self._send(client, pending)
            del client.outbox[:sent]
            drained = not client.outbox
            if drained:
                client.waiting = False
        if client.broken or (drained and client.ending):
            self._close(client)
        elif drained:
            self.io.remove_writer(client.fd)

    def close(self) -> None:
        """Stop listening and close every connection (on the I/O thread while it runs)."""
        def close_all():
            if self.sock.fileno() >= 0:
                self.io.remove_reader(self.sock.fileno())
                self.sock.close()
            for client in list(self.clients.values()):
                self._close(client)
        try:
            self.io.run_sync(close_all)
        except RuntimeError:  # the I/O thread is stuck or gone: nobody else touches these sockets any more
            close_all()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def connect(path, timeout: float) -> socket.socket:
    """A connection to a control socket, waiting up to `timeout` for room in its listen backlog (a Unix socket
    with a timeout fails with EAGAIN at once rather than waiting); the socket keeps that timeout."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            sock.connect(str(path))
            sock.settimeout(timeout)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{path}: the control socket accepts no connection") from None
            time.sleep(0.01)
        except BaseException:
            sock.close()
            raise


def request(path, cmd: str, timeout: float = 10.0) -> dict:
    """Send one request to an instance's control socket and return the JSON reply."""
    with connect(path, timeout) as sock:
        sock.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return json.loads(data or b"{}")


DETACH = 0x1D  # Ctrl-]


def attach_console(path, in_fd: int, out_fd: int, detach: int = DETACH, on_attached=None) -> str:
    """Relay an instance's serial console to this terminal until Ctrl-] (or the VM ends). Returns why it ended;
    `on_attached()` runs once the VM accepted the connection."""
    import selectors

    with connect(path, 10.0) as sock:
        sock.sendall(b'{"cmd": "console"}\n')
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                return "the VM is gone"
            reply += chunk
        answer = json.loads(reply)
        if not answer.get("ok"):
            return f"the VM refused the console: {answer.get('error', 'no reason given')}"
        sock.settimeout(None)  # attached: wait for the guest and the user as long as they take
        if on_attached is not None:
            on_attached()
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ, "vm")
        sel.register(in_fd, selectors.EVENT_READ, "user")
        while True:
            for key, _ in sel.select():
                if key.data == "vm":
                    data = sock.recv(65536)
                    if not data:
                        return "the VM ended"
                    os.write(out_fd, data)
                else:
                    data = os.read(in_fd, 4096)
                    if not data:
                        return "end of input"
                    if detach in data:
                        sock.sendall(data[:data.index(detach)])
                        return "detached"
                    sock.sendall(data)
