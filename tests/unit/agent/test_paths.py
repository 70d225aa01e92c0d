"""How tandemctl finds the local agent's socket (⚑: --socket, --node/$TANDEM_NODE, the only one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.paths import SocketNotFound, find_socket


@pytest.fixture
def socket_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TANDEM_SOCKET_DIR", str(tmp_path))
    monkeypatch.delenv("TANDEM_NODE", raising=False)
    return tmp_path


def test_explicit_socket_wins(socket_dir: Path) -> None:
    assert find_socket("/x/y.sock", "node1") == Path("/x/y.sock")


def test_node_names_the_socket(socket_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_socket(None, "node2") == socket_dir / "node2.sock"
    monkeypatch.setenv("TANDEM_NODE", "node1")
    assert find_socket(None, None) == socket_dir / "node1.sock"


def test_the_only_socket_is_taken(socket_dir: Path) -> None:
    (socket_dir / "node1.sock").touch()
    assert find_socket(None, None) == socket_dir / "node1.sock"


def test_several_sockets_are_a_usage_error_listing_them(socket_dir: Path) -> None:
    (socket_dir / "node1.sock").touch()
    (socket_dir / "node2.sock").touch()
    with pytest.raises(SocketNotFound) as err:
        find_socket(None, None)
    assert err.value.usage
    assert "node1, node2" in str(err.value) and "--node" in str(err.value)


def test_no_socket_means_unreachable(socket_dir: Path) -> None:
    with pytest.raises(SocketNotFound) as err:
        find_socket(None, None)
    assert not err.value.usage
    assert "tandem-agent" in str(err.value)
