"""The replication stream on real sockets: handshake, authentication, refusals."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from agent.core import mirror_frames as mf
from agent.core.mirror_ops import Write, decode_op, encode_op
from agent.mirror import link
from tests.lab import wait_for

KEY = bytes(range(32))


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    try:
        yield server
    finally:
        server.close()


def serve_one(
    server: socket.socket, key: bytes = KEY
) -> tuple[threading.Thread, dict[str, object]]:
    """Accept one stream the way the agent and receiver do; results land in the dict."""
    out: dict[str, object] = {}

    def run() -> None:
        conn, _ = server.accept()
        try:
            hello = link.read_hello(conn, key)
            out["hello"] = hello
            stream = link.accept(conn, link.parse_hello_frame(hello.raw, key), key, "node2")
            out["stream"] = stream
        except (mf.StreamError, link.LinkClosed) as exc:
            out["error"] = exc
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def open_session(listener: socket.socket) -> tuple[link.Stream, link.Stream, link.Hello]:
    """A client stream connected to a server stream accepted as the agent does, and the HELLO."""
    thread, out = serve_one(listener)
    port = listener.getsockname()[1]
    client = link.connect("127.0.0.1", port, KEY, cluster="c", module="web", node="node1")
    thread.join(5)
    server, hello = out["stream"], out["hello"]
    assert isinstance(server, link.Stream) and isinstance(hello, link.Hello)
    return client, server, hello


def test_handshake_then_frames_flow_both_ways(listener: socket.socket) -> None:
    client, server, hello = open_session(listener)
    assert (hello.cluster, hello.module, hello.node) == ("c", "web", "node1")
    try:
        big = bytes(range(256)) * 4096  # a 1 MiB write goes out without being copied into a frame
        client.send_op(Write(0, "f", 0, big))
        header, payload = server.receive()
        assert header.kind is mf.FrameKind.OP and header.seq == 1
        assert decode_op(payload) == Write(0, "f", 0, big)
        server.send_json(mf.FrameKind.ACK, {"n": 1})
        header, payload = client.receive()
        assert header.kind is mf.FrameKind.ACK and mf.decode_json(payload) == {"n": 1}
        assert client.peer == "node2"
    finally:
        client.close()
        server.close()


def test_a_client_with_another_key_is_refused(listener: socket.socket) -> None:
    thread, out = serve_one(listener)
    port = listener.getsockname()[1]
    with pytest.raises((link.LinkClosed, mf.StreamError)):
        link.connect("127.0.0.1", port, bytes(32), cluster="c", module="web", node="x", timeout=2)
    thread.join(5)
    assert isinstance(out.get("error"), mf.StreamError)
    assert "failed authentication" in str(out["error"])


def test_a_corrupted_frame_ends_the_stream_with_the_reason(listener: socket.socket) -> None:
    client, server, _hello = open_session(listener)
    try:
        frame = bytearray(mf.encode(b"\0" * 32, mf.FrameKind.OP, 1, b"forged write"))
        client.sock.sendall(frame)
        with pytest.raises(mf.StreamError, match="failed authentication"):
            server.receive()
    finally:
        client.close()
        server.close()


def test_a_refusal_reaches_the_client_in_words(listener: socket.socket) -> None:
    def refuse() -> None:
        conn, _ = listener.accept()
        link.read_hello(conn, KEY)
        link.refuse(conn, KEY, "module web has no replicated directories here")

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    with pytest.raises(link.LinkClosed, match="no replicated directories"):
        link.connect("127.0.0.1", port, KEY, cluster="c", module="web", node="node1")
    thread.join(5)


def test_an_unreachable_peer_is_named() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(link.LinkClosed, match=f"cannot reach 127.0.0.1:{port}"):
        link.connect("127.0.0.1", port, KEY, cluster="c", module="web", node="node1")


def test_bursts_of_frames_of_any_size_arrive_whole_and_in_order(listener: socket.socket) -> None:
    """Frames are cut from one receive buffer: many in one recv, one larger than the buffer,
    and frames split across recvs all come out whole, verified, in order."""
    client, server, _hello = open_session(listener)
    sizes = [0, 1, 4096, 3, link.RECEIVE_BUFFER + 12345, 7, 65536, 1 << 20, 5] + [4096] * 600
    expected = [Write(0, f"f{n}", n, bytes([n % 251]) * size) for n, size in enumerate(sizes)]
    received: list[object] = []

    def drain() -> None:
        for _ in expected:
            received.append(decode_op(server.receive()[1]))
        received.append(server.pending())

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        # Small batches, single frames and one sendmsg of hundreds of frames.
        client.send_op(expected[0])
        client.send_frames([(mf.FrameKind.OP, [encode_op(op)]) for op in expected[1:4]])
        for op in expected[4:9]:
            client.send_op(op)
        client.send_frames([(mf.FrameKind.OP, [encode_op(op)]) for op in expected[9:]])
        reader.join(30)
        assert received[:-1] == expected
        assert received[-1] is False  # nothing more is waiting
        client.send_json(mf.FrameKind.CONTROL, {"type": "x"})
        assert wait_for(server.pending, 5, interval=0.001)
        assert mf.decode_json(server.receive()[1]) == {"type": "x"}
    finally:
        client.close()
        server.close()
