"""The VIP for real: netlink in one namespace, ARP seen from the other."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from agent.host.vip import (
    Vip,
    VipError,
    add_vip,
    address_in_use,
    announce,
    has_vip,
    remove_vip,
    remove_vip_sync,
)
from tests.unit.agent.host.netns import NetnsPair, in_netns, in_netns_sync, ip, netns_pair

VIP = "198.18.0.100/24"
OLD_MAC = "02:00:00:00:00:01"


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    with netns_pair() as made:
        yield made


@pytest.fixture
def bridged() -> Iterator[NetnsPair]:
    with netns_pair(bridge=True) as made:
        yield made


def neighbour_mac(ns: str, address: str) -> str | None:
    """The MAC that namespace `ns` has cached for `address`, if any."""
    words = ip("-n", ns, "neigh", "show", address, "dev", "eth0").split()
    return words[words.index("lladdr") + 1] if "lladdr" in words else None


def wait_for(what: str, condition: object, timeout: float = 10.0) -> None:
    """Polls `condition()` until it is true; fails naming `what` at the deadline."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_address_needs_a_prefix_length() -> None:
    with pytest.raises(VipError, match=r"no prefix length.*198\.18\.0\.100/24"):
        Vip("198.18.0.100", "eth0")


def test_bad_address_and_interface_are_named() -> None:
    with pytest.raises(VipError, match=r"'198\.18\.0\.300/24' is not an IPv4 address"):
        Vip("198.18.0.300/24", "eth0")
    with pytest.raises(VipError, match="'a-name-that-is-far-too-long'"):
        Vip(VIP, "a-name-that-is-far-too-long")


def test_ip_and_prefixlen() -> None:
    vip = Vip(VIP, "eth0")
    assert (vip.ip, vip.prefixlen) == ("198.18.0.100", 24)


@pytest.mark.root
def test_add_and_remove_are_idempotent(pair: NetnsPair) -> None:
    vip = Vip(VIP, pair.interface)

    async def scenario() -> list[bool]:
        seen = [await has_vip(vip)]
        await add_vip(vip)
        await add_vip(vip)
        seen.append(await has_vip(vip))
        seen.append(await remove_vip(vip))
        seen.append(await remove_vip(vip))
        seen.append(await has_vip(vip))
        return seen

    assert in_netns(pair.a, scenario) == [False, True, True, False, False]
    assert "198.18.0.100" not in ip("-n", pair.a, "addr")


@pytest.mark.root
def test_added_vip_is_seen_by_ip_and_removed_by_the_sync_call(pair: NetnsPair) -> None:
    vip = Vip(VIP, pair.interface)
    in_netns(pair.a, lambda: add_vip(vip))
    assert "inet 198.18.0.100/24" in ip("-n", pair.a, "addr", "show", "eth0")
    assert "198.18.0.100" not in ip("-n", pair.b, "addr")
    assert in_netns_sync(pair.a, lambda: remove_vip_sync(vip)) is True
    assert "198.18.0.100" not in ip("-n", pair.a, "addr")


@pytest.mark.root
def test_removing_the_vip_keeps_the_nodes_own_address(pair: NetnsPair) -> None:
    # The VIP goes on first, so the kernel makes it the primary of the subnet and the node's
    # own address a secondary; removing the VIP must not take that address with it.
    ip("-n", pair.a, "addr", "flush", "dev", "eth0")
    vip = Vip(VIP, pair.interface)
    in_netns(pair.a, lambda: add_vip(vip))
    ip("-n", pair.a, "addr", "add", pair.address_a, "dev", "eth0")
    assert in_netns(pair.a, lambda: remove_vip(vip)) is True
    assert f"inet {pair.address_a}" in ip("-n", pair.a, "addr", "show", "eth0")


@pytest.mark.root
def test_missing_interface_is_named(pair: NetnsPair) -> None:
    vip = Vip(VIP, "nosuch0")
    with pytest.raises(VipError, match="interface 'nosuch0' does not exist"):
        in_netns(pair.a, lambda: add_vip(vip))
    with pytest.raises(VipError, match="'nosuch0' does not exist"):
        in_netns(pair.a, lambda: announce(vip, repeat_after=None))
    with pytest.raises(VipError, match="'nosuch0' does not exist"):
        in_netns(pair.a, lambda: address_in_use(vip))
    assert in_netns(pair.a, lambda: remove_vip(vip)) is False


@pytest.mark.root
def test_announce_moves_the_neighbours_cache_and_repeats(bridged: NetnsPair) -> None:
    vip = Vip(VIP, bridged.interface)
    mac_a = bridged.mac(bridged.a)
    # B still believes the VIP is at the old holder's MAC, as after a failover.
    ip(
        "-n",
        bridged.b,
        "neigh",
        "replace",
        vip.ip,
        "lladdr",
        OLD_MAC,
        "dev",
        "eth0",
        "nud",
        "stale",
    )

    async def scenario() -> None:
        await add_vip(vip)
        repeat = await announce(vip, count=3, repeat_after=1.0)
        assert repeat is not None
        await asyncio.to_thread(
            wait_for, "the first burst", lambda: neighbour_mac(bridged.b, vip.ip) == mac_a
        )
        # Undo it before the repeat fires: the repeat alone must set it right again.
        ip(
            "-n",
            bridged.b,
            "neigh",
            "replace",
            vip.ip,
            "lladdr",
            OLD_MAC,
            "dev",
            "eth0",
            "nud",
            "stale",
        )
        await repeat

    in_netns(bridged.a, scenario)
    wait_for("the repeated burst", lambda: neighbour_mac(bridged.b, vip.ip) == mac_a)


@pytest.mark.root
def test_announce_repeat_can_be_cancelled(pair: NetnsPair) -> None:
    vip = Vip(VIP, pair.interface)

    async def scenario() -> bool:
        await add_vip(vip)
        repeat = await announce(vip, repeat_after=60.0)
        assert repeat is not None
        repeat.cancel()
        with pytest.raises(asyncio.CancelledError):
            await repeat
        return repeat.cancelled()

    assert in_netns(pair.a, scenario) is True


@pytest.mark.root
def test_address_in_use_sees_the_holder_only_while_it_holds(pair: NetnsPair) -> None:
    vip = Vip(VIP, pair.interface)
    assert in_netns(pair.b, lambda: address_in_use(vip, timeout=0.5)) is False
    in_netns(pair.a, lambda: add_vip(vip))
    assert in_netns(pair.b, lambda: address_in_use(vip, timeout=2.0)) is True
    in_netns(pair.a, lambda: remove_vip(vip))
    assert in_netns(pair.b, lambda: address_in_use(vip, timeout=0.5)) is False
