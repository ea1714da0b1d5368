"""Downloads against the local HTTP server (tests/images/httpserver.py): whole files, transfers cut in the middle and
resumed with a Range request, servers that ignore Range or answer the wrong range, a file changed between two
attempts, size limits, endless and crawling servers, redirects; locations; bounded text fetches; the progress line.
Digests are checked against `sha256sum`."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
from pathlib import Path

import pytest

from cloudkvm.errors import CloudkvmError
from cloudkvm.images import fetch
from httpserver import HttpServer

SIZE = 3 << 20


def sha256sum(path: Path) -> str:
    return subprocess.run(["sha256sum", str(path)], check=True, capture_output=True, text=True).stdout.split()[0]


@pytest.fixture
def served(tmp_path):
    folder = tmp_path / "www"
    folder.mkdir()
    (folder / "image.qcow2").write_bytes(os.urandom(SIZE))
    with HttpServer(folder) as server:
        yield server, folder


def test_a_whole_download_and_its_digests(served, tmp_path):
    server, folder = served
    part = tmp_path / "x.part"
    size, digests = fetch.download(server.url("image.qcow2"), part, {"sha256", "sha512"}, progress=False)
    assert size == SIZE and part.read_bytes() == (folder / "image.qcow2").read_bytes()
    assert digests["sha256"] == sha256sum(folder / "image.qcow2")
    assert digests["sha512"] == hashlib.sha512(part.read_bytes()).hexdigest()
    assert [(r["status"], r["range"]) for r in server.requests] == [(200, None)]


def test_a_cut_transfer_resumes_with_a_range_request(served, tmp_path):
    server, folder = served
    server.cut_next(1 << 20)
    part = tmp_path / "x.part"
    size, digests = fetch.download(server.url("image.qcow2"), part, {"sha256"}, progress=False)
    assert digests["sha256"] == sha256sum(folder / "image.qcow2") and size == SIZE
    first, second = server.requests
    assert (first["status"], first["sent"]) == (200, 1 << 20)
    assert second["range"] == f"bytes={1 << 20}-" and second["if_range"]  # guarded by the ETag
    assert (second["status"], second["sent"]) == (206, SIZE - (1 << 20))
    assert server.bytes_sent == SIZE  # nothing was sent twice


def test_a_transfer_cut_again_and_again_keeps_its_part_for_the_next_call(served, tmp_path, monkeypatch):
    server, folder = served
    monkeypatch.setattr(fetch, "RESUMES", 2)
    server.cut_next(256 << 10, times=3)
    part = tmp_path / "x.part"
    with pytest.raises(CloudkvmError) as err:
        fetch.download(server.url("image.qcow2"), part, {"sha256"}, progress=False)
    assert "the transfer stopped 3 times" in err.value.message and "resumes" in err.value.hint
    assert part.stat().st_size == 3 * (256 << 10)
    server.reset_counters()
    size, digests = fetch.download(server.url("image.qcow2"), part, {"sha256"}, progress=False)
    assert digests["sha256"] == sha256sum(folder / "image.qcow2")
    [resumed] = server.requests
    assert resumed["range"] == f"bytes={3 * (256 << 10)}-" and resumed["status"] == 206
    assert server.bytes_sent == SIZE - 3 * (256 << 10)


def test_a_server_ignoring_range_makes_the_download_start_over(served, tmp_path):
    server, folder = served
    server.ranges = False
    server.cut_next(1 << 20)
    part = tmp_path / "x.part"
    size, digests = fetch.download(server.url("image.qcow2"), part, {"sha256"}, progress=False)
    assert digests["sha256"] == sha256sum(folder / "image.qcow2") and size == SIZE
    assert [(r["status"], r["sent"]) for r in server.requests] == [(200, 1 << 20), (200, SIZE)]
    assert server.requests[1]["range"] == f"bytes={1 << 20}-"  # asked, was refused


def test_a_206_for_another_range_is_not_appended(served, tmp_path):
    server, folder = served
    server.cut_next(1 << 20)
    server.content_range_shift = -100  # "bytes 1048476-..." for a request from 1048576
    part = tmp_path / "x.part"
    _, digests = fetch.download(server.url("image.qcow2"), part, {"sha256"}, progress=False)
    assert digests["sha256"] == sha256sum(folder / "image.qcow2")
    assert [r["range"] is None for r in server.requests] == [True, False, True]


def test_a_file_changed_upstream_is_fetched_afresh_not_spliced(served, tmp_path):
    server, folder = served
    server.cut_next(1 << 20)
    part = tmp_path / "x.part"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fetch, "RESUMES", 0)
        with pytest.raises(CloudkvmError):
            fetch.download(server.url("image.qcow2"), part, {"sha256"}, progress=False)
    (folder / "image.qcow2").write_bytes(os.urandom(SIZE))  # a new release under the same name (new ETag)
    _, digests = fetch.download(server.url("image.qcow2"), part, {"sha256"}, progress=False)
    assert digests["sha256"] == sha256sum(folder / "image.qcow2")
    assert server.requests[-1]["if_range"] and server.requests[-1]["status"] == 200


def test_a_complete_part_is_recognized_by_416(served, tmp_path):
    server, folder = served
    part = tmp_path / "x.part"
    part.write_bytes((folder / "image.qcow2").read_bytes())  # a crash after the last byte, before the rename
    _, digests = fetch.download(server.url("image.qcow2"), part, {"sha256"}, progress=False)
    assert digests["sha256"] == sha256sum(folder / "image.qcow2")
    assert [r["status"] for r in server.requests] == [416] and server.bytes_sent == 0


def test_an_announced_size_beyond_the_limit_is_refused_before_writing(served, tmp_path):
    server, _ = served
    server.endless["/huge.qcow2"] = 100 << 30
    part = tmp_path / "x.part"
    with pytest.raises(CloudkvmError) as err:
        fetch.download(server.url("huge.qcow2"), part, {"sha256"}, progress=False)
    assert f"announces {100 << 30} bytes" in err.value.message and part.stat().st_size == 0


def test_an_endless_body_stops_at_the_limit(served, tmp_path):
    server, _ = served
    server.endless["/forever"] = None
    part = tmp_path / "x.part"
    with pytest.raises(CloudkvmError) as err:
        fetch.download(server.url("forever"), part, {"sha256"}, limit=2 << 20, progress=False)
    assert "more than 2097152 bytes" in err.value.message
    assert part.stat().st_size <= 2 << 20


def test_a_crawling_server_is_given_up(served, tmp_path, monkeypatch):
    server, _ = served
    monkeypatch.setattr(fetch, "LOW_SPEED_SECONDS", 0.6)
    monkeypatch.setattr(fetch, "RESUMES", 0)
    server.piece, server.delay = 16, 0.1  # 160 bytes/s, less than 1024
    with pytest.raises(CloudkvmError) as err:
        fetch.download(server.url("image.qcow2"), tmp_path / "x.part", {"sha256"}, progress=False)
    assert "slower than 1024 bytes/s" in err.value.message


def test_a_silent_server_times_out(served, tmp_path, monkeypatch):
    server, _ = served
    monkeypatch.setattr(fetch, "TIMEOUT", 0.5)
    monkeypatch.setattr(fetch, "RESUMES", 0)
    server.delay = 3
    with pytest.raises(CloudkvmError) as err:
        fetch.download(server.url("image.qcow2"), tmp_path / "x.part", {"sha256"}, progress=False)
    assert "no answer within 0.5 s" in err.value.message


def test_redirects_are_followed_to_http_only(served, tmp_path):
    server, folder = served
    server.redirects["/latest"] = "/image.qcow2"
    _, digests = fetch.download(server.url("latest"), tmp_path / "a.part", {"sha256"}, progress=False)
    assert digests["sha256"] == sha256sum(folder / "image.qcow2")
    for target in (f"file://{folder}/image.qcow2", "ftp://127.0.0.1/image.qcow2"):
        server.redirects["/elsewhere"] = target
        with pytest.raises(CloudkvmError) as err:
            fetch.download(server.url("elsewhere"), tmp_path / "b.part", {"sha256"}, progress=False)
        assert "redirected to" in err.value.message or "HTTP 302" in err.value.message
        assert "\n" not in err.value.message


def test_http_errors_and_closed_ports_are_one_line(served, tmp_path):
    server, _ = served
    with pytest.raises(CloudkvmError) as err:
        fetch.download(server.url("missing.qcow2"), tmp_path / "x.part", {"sha256"}, progress=False)
    assert err.value.message == f"{server.url('missing.qcow2')}: the server answered HTTP 404 Not Found"
    port = server.port
    server.stop()
    with pytest.raises(CloudkvmError) as err:
        fetch.download(f"http://127.0.0.1:{port}/image.qcow2", tmp_path / "y.part", {"sha256"}, progress=False)
    assert "cannot download: Connection refused" in err.value.message


@pytest.mark.parametrize("text, kind", [
    ("https://example.org/a/b%20c.qcow2", "remote"), ("HTTP://example.org/x", "remote"),
    ("file:///srv/img.qcow2", "/srv/img.qcow2"), ("file://localhost/srv/img.qcow2", "/srv/img.qcow2"),
    ("/srv/img.qcow2", "/srv/img.qcow2"), ("rel/img.qcow2", "CWD/rel/img.qcow2"), ("~/img.qcow2", "HOME/img.qcow2"),
])
def test_locations(text, kind, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    source = fetch.parse_location(text)
    if kind == "remote":
        assert source.remote and source.location == text
    else:
        expected = kind.replace("CWD", str(tmp_path)).replace("HOME", str(tmp_path / "home"))
        assert source.path == Path(expected) and source.location == expected
    assert fetch.parse_location("https://example.org/a/b%20c.qcow2").file_name == "b c.qcow2"


@pytest.mark.parametrize("text, words", [
    ("ftp://example.org/x.qcow2", "not an http, https or file URL"), ("file://otherhost/x", "names another host"),
    ("https:///x.qcow2", "names no host"), ("  ", "empty image location"),
])
def test_bad_locations(text, words):
    with pytest.raises(CloudkvmError) as err:
        fetch.parse_location(text, "images[0].location")
    assert words in err.value.message and err.value.message.startswith("images[0].location:")


def test_fetch_text_is_bounded(served, tmp_path):
    server, folder = served
    (folder / "SHA256SUMS").write_text("abc  image.qcow2\n")
    assert fetch.fetch_text(server.url("SHA256SUMS")) == "abc  image.qcow2\n"
    assert fetch.fetch_text(str(folder / "SHA256SUMS")) == "abc  image.qcow2\n"
    assert fetch.fetch_text(f"file://{folder}/SHA256SUMS") == "abc  image.qcow2\n"
    with pytest.raises(CloudkvmError) as err:
        fetch.fetch_text(server.url("image.qcow2"))  # 3 MiB announced
    assert f"{SIZE} bytes, more than the {1 << 20}" in err.value.message
    server.endless["/endless"] = None
    with pytest.raises(CloudkvmError) as err:
        fetch.fetch_text(server.url("endless"), limit=100_000)
    assert "more than 100000 bytes" in err.value.message
    with pytest.raises(CloudkvmError) as err:
        fetch.fetch_text(str(folder / "image.qcow2"))
    assert "cannot read the checksum file" in err.value.message
    os.mkfifo(folder / "fifo")  # never blocks on a FIFO
    with pytest.raises(CloudkvmError):
        fetch.fetch_text(str(folder / "fifo"))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_redrawn_line_on_a_terminal_only():
    term, pipe = Terminal(), io.StringIO()
    for stream in (term, pipe):
        bar = fetch.Progress("debian-12.qcow2", stream=stream)
        bar.update(1 << 20, 4 << 20, final=True)
        bar.update(4 << 20, 4 << 20, final=True)
        bar.close()
    assert pipe.getvalue() == ""
    text = term.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") == 2
    assert " 25% " in text and "100%" in text and "4.0 MiB" in text and "MiB/s" in text


def test_no_progress_when_stderr_is_not_a_terminal(served, tmp_path, capfd):
    server, _ = served
    fetch.download(server.url("image.qcow2"), tmp_path / "x.part", {"sha256"})
    assert capfd.readouterr().err == ""
