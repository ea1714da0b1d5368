"""The control socket: a Unix socket (mode 0600) in the instance folder, one JSON request per line.

Requests: {"cmd": "status"} → {"ok": true, ...}; {"cmd": "shutdown"} asks the guest to power off (ACPI power
button); {"cmd": "stop"} ends the VM now; {"cmd": "console"} turns the connection into the raw serial stream
(guest output to the client, client bytes to the guest's UART)."""
import json
import logging
import os
import socket
import time

log = logging.getLogger("cloudkvm.control")
MAX_REQUEST = 4096


class ControlServer:
    """Serves the control socket from the machine's I/O thread."""

    def __init__(self, machine, path, info: dict):
        self.machine = machine
        self.path = str(path)
        self.info = info
        self.started = time.time()
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
        self.sock.listen(8)
        machine.io.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        buffer = bytearray()

        def readable():
            try:
                data = conn.recv(MAX_REQUEST)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.machine.io.remove_reader(conn.fileno())
                conn.close()
                return
            buffer.extend(data)
            if b"\n" not in buffer:
                if len(buffer) > MAX_REQUEST:
                    self._reply(conn, {"ok": False, "error": "request too long"})
                    self.machine.io.remove_reader(conn.fileno())
                    conn.close()
                return
            line, _, rest = bytes(buffer).partition(b"\n")
            buffer[:] = rest
            self._handle(conn, line)

        self.machine.io.add_reader(conn.fileno(), readable)

    def _reply(self, conn, obj: dict) -> None:
        try:
            conn.setblocking(True)
            conn.sendall(json.dumps(obj).encode() + b"\n")
            conn.setblocking(False)
        except OSError:
            pass

    def _handle(self, conn, line: bytes) -> None:
        try:
            request = json.loads(line)
            cmd = request["cmd"]
        except (ValueError, KeyError, TypeError):
            self._reply(conn, {"ok": False, "error": "bad request: want a JSON object with 'cmd'"})
            return
        if cmd == "status":
            self._reply(conn, {"ok": True, "state": "running", "pid": os.getpid(),
                               "uptime": time.time() - self.started, **self.info})
        elif cmd == "shutdown":
            sent = self.machine.request_shutdown()
            self._reply(conn, {"ok": sent, **({} if sent else {"error": "this board has no power button"})})
        elif cmd == "stop":
            self._reply(conn, {"ok": True})
            from .vcpu_loop import VmResult  # noqa: PLC0415  (avoid a cycle at import time)
            self.machine.end(VmResult("stopped", "stopped through the control socket"))
        elif cmd == "console":
            self._reply(conn, {"ok": True})
            self._attach(conn)
        else:
            self._reply(conn, {"ok": False, "error": f"unknown command '{cmd}'"})

    def _attach(self, conn) -> None:
        """Stream guest output to `conn`; bytes from `conn` go to the guest's serial input."""
        io = self.machine.io
        io.remove_reader(conn.fileno())

        def output(data: bytes):
            try:
                conn.send(data)  # non-blocking: a slow client loses output rather than stalling the guest
            except (BlockingIOError, OSError):
                pass

        def readable():
            try:
                data = conn.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.machine.console.remove_listener(output)
                io.remove_reader(conn.fileno())
                conn.close()
                return
            self.machine.board.serial_input(data)

        self.machine.console.add_listener(output)
        io.add_reader(conn.fileno(), readable)

    def close(self) -> None:
        try:
            self.sock.close()
            os.unlink(self.path)
        except OSError:
            pass


def request(path, cmd: str, timeout: float = 10.0) -> dict:
    """Send one request to an instance's control socket and return the JSON reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
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

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(b'{"cmd": "console"}\n')
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                return "the VM is gone"
            reply += chunk
        if not json.loads(reply).get("ok"):
            return "the VM refused the console"
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
