"""The virtual IP of a module: add and remove it by netlink, announce it and probe for it by ARP.

Everything acts in the network namespace of the calling thread: the agent runs inside the
node's namespace, so that is the node's network.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

ETH_P_ARP = 0x0806
ARPHRD_ETHER = 1
PACKET_OUTGOING = 4
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
ZERO_IP = b"\x00" * 4


class VipError(Exception):
    """A VIP could not be handled; the message names the VIP, the interface and the cause."""


@dataclass(frozen=True)
class Vip:
    """An IPv4 address with its prefix length, held on one interface of this node."""

    address: str
    interface: str

    def __post_init__(self) -> None:
        if "/" not in self.address:
            raise VipError(
                f"VIP address {self.address!r} has no prefix length: write it as e.g. "
                f"{self.address}/24"
            )
        try:
            ipaddress.IPv4Interface(self.address)
        except ValueError as e:
            raise VipError(
                f"VIP address {self.address!r} is not an IPv4 address with a prefix length "
                f"(e.g. 198.18.0.100/24): {e}"
            ) from None
        if not self.interface or len(self.interface) > 15 or "/" in self.interface:
            raise VipError(
                f"VIP interface {self.interface!r} is not a network interface name "
                "(1 to 15 characters, no '/')"
            )

    @property
    def ip(self) -> str:
        """The address without its prefix length, e.g. "198.18.0.100"."""
        return str(ipaddress.IPv4Interface(self.address).ip)

    @property
    def prefixlen(self) -> int:
        """The prefix length, e.g. 24."""
        return ipaddress.IPv4Interface(self.address).network.prefixlen


async def _index(ipr: AsyncIPRoute, interface: str) -> int | None:
    found: list[int] = await ipr.link_lookup(ifname=interface)
    return found[0] if found else None


async def _holds(ipr: AsyncIPRoute, index: int, vip: Vip) -> bool:
    async for msg in await ipr.get_addr(family=socket.AF_INET, index=index):
        if msg.get("address") == vip.ip and msg["prefixlen"] == vip.prefixlen:
            return True
    return False


def _promote_secondaries(interface: str) -> None:
    # Without this, removing an address that the kernel made primary in its subnet also
    # removes every secondary one: a VIP added before the node's own address would take
    # that address with it. keepalived recommends the same setting.
    path = f"/proc/sys/net/ipv4/conf/{interface}/promote_secondaries"
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError as e:
        log.debug("cannot set %s: %s", path, e)


async def add_vip(vip: Vip) -> None:
    """Put the VIP on its interface; nothing happens if it is already there."""
    async with AsyncIPRoute() as ipr:
        index = await _index(ipr, vip.interface)
        if index is None:
            raise VipError(
                f"cannot add VIP {vip.address}: interface {vip.interface!r} does not exist "
                "on this node; fix the module's vip.interface"
            )
        if await _holds(ipr, index, vip):
            return
        _promote_secondaries(vip.interface)
        try:
            await ipr.addr("add", index=index, address=vip.ip, prefixlen=vip.prefixlen)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise VipError(f"cannot add VIP {vip.address} on {vip.interface}: {e}") from None


async def remove_vip(vip: Vip) -> bool:
    """Take the VIP off its interface; True if it was there (a missing interface holds none)."""
    async with AsyncIPRoute() as ipr:
        index = await _index(ipr, vip.interface)
        if index is None or not await _holds(ipr, index, vip):
            return False
        try:
            await ipr.addr("del", index=index, address=vip.ip, prefixlen=vip.prefixlen)
        except NetlinkError as e:
            # Gone between the look and the removal: someone else removed it.
            if e.code in (errno.EADDRNOTAVAIL, errno.ENODEV):
                return False
            raise VipError(f"cannot remove VIP {vip.address} from {vip.interface}: {e}") from None
        return True


async def has_vip(vip: Vip) -> bool:
    """True if the VIP is on its interface now."""
    async with AsyncIPRoute() as ipr:
        index = await _index(ipr, vip.interface)
        return index is not None and await _holds(ipr, index, vip)


def add_vip_sync(vip: Vip) -> None:
    """add_vip for code without an event loop (the guard); not callable inside a running loop."""
    asyncio.run(add_vip(vip))


def remove_vip_sync(vip: Vip) -> bool:
    """remove_vip for code without an event loop (the guard); not callable inside a running loop."""
    return asyncio.run(remove_vip(vip))


def has_vip_sync(vip: Vip) -> bool:
    """has_vip for code without an event loop; not callable inside a running loop."""
    return asyncio.run(has_vip(vip))


def _arp_socket(vip: Vip) -> tuple[socket.socket, bytes]:
    """A raw ARP socket bound to the VIP's interface, with that interface's MAC address."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    try:
        sock.bind((vip.interface, ETH_P_ARP))
        _, _, _, hatype, mac = sock.getsockname()
        if hatype != ARPHRD_ETHER:
            raise VipError(f"interface {vip.interface!r} of VIP {vip.address} is not Ethernet")
        sock.setblocking(False)
        return sock, bytes(mac)
    except OSError as e:
        sock.close()
        if e.errno == errno.ENODEV:
            raise VipError(
                f"VIP {vip.address}: interface {vip.interface!r} does not exist on this node; "
                "fix the module's vip.interface"
            ) from None
        raise VipError(f"VIP {vip.address}: cannot use interface {vip.interface!r}: {e}") from None
    except VipError:
        sock.close()
        raise


def _arp_frame(
    op: int, sender_mac: bytes, sender_ip: bytes, target_mac: bytes, target_ip: bytes
) -> bytes:
    ether = BROADCAST_MAC + sender_mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", ARPHRD_ETHER, 0x0800, 6, 4, op)
    return ether + arp + sender_mac + sender_ip + target_mac + target_ip


def _send_garp(vip: Vip, count: int) -> None:
    sock, mac = _arp_socket(vip)
    ip = socket.inet_aton(vip.ip)
    # A request whose sender and target are both the VIP, as `arping -U` sends: every
    # neighbour that has the VIP in its cache takes our MAC for it.
    frame = _arp_frame(ARPOP_REQUEST, mac, ip, BROADCAST_MAC, ip)
    try:
        for _ in range(count):
            sock.send(frame)
    except OSError as e:
        raise VipError(f"cannot announce VIP {vip.address} on {vip.interface}: {e}") from None
    finally:
        sock.close()


async def announce(
    vip: Vip, count: int = 3, repeat_after: float | None = 1.0
) -> asyncio.Task[None] | None:
    """Tell the LAN by gratuitous ARP that the VIP is here: a burst now, one more burst later.

    As keepalived does, the second burst catches switches and hosts that missed the first
    (a port still coming up). The burst goes out before this returns; the repeat runs as the
    returned task, which the caller may cancel (when the VIP is released meanwhile).
    """
    _send_garp(vip, count)
    if repeat_after is None:
        return None
    return asyncio.create_task(_repeat(vip, count, repeat_after), name=f"garp {vip.address}")


async def _repeat(vip: Vip, count: int, after: float) -> None:
    await asyncio.sleep(after)
    try:
        _send_garp(vip, count)
    except VipError as e:
        log.warning("%s", e)


async def address_in_use(vip: Vip, timeout: float = 1.0, probes: int = 2) -> bool:
    """True if another host answers for the VIP's address (ARP probe, RFC 5227).

    Call it before adding the VIP: once this node holds the address, the kernel answers
    other hosts' probes itself but not our own, so the answer would say nothing about them.
    The probes are spread over `timeout`; the first answer ends the wait.
    """
    sock, mac = _arp_socket(vip)
    ip = socket.inet_aton(vip.ip)
    probe = _arp_frame(ARPOP_REQUEST, mac, ZERO_IP, ZERO_MAC, ip)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    next_probe = loop.time()
    sent = 0
    try:
        while True:
            now = loop.time()
            if sent < probes and now >= next_probe:
                sock.send(probe)
                sent += 1
                next_probe = now + timeout / probes
            wake = min(deadline, next_probe) if sent < probes else deadline
            if now >= deadline:
                return False
            try:
                data, addr = await asyncio.wait_for(
                    loop.sock_recvfrom(sock, 2048), max(wake - now, 0.001)
                )
            except TimeoutError:
                continue
            if addr[2] != PACKET_OUTGOING and _answers_for(data, ip, mac):
                return True
    except OSError as e:
        raise VipError(f"cannot probe for VIP {vip.address} on {vip.interface}: {e}") from None
    finally:
        sock.close()


def _answers_for(frame: bytes, ip: bytes, own_mac: bytes) -> bool:
    """True if the frame is an ARP packet from another host that claims the address `ip`."""
    if len(frame) < 42:
        return False
    op = struct.unpack("!H", frame[20:22])[0]
    sender_mac, sender_ip = frame[22:28], frame[28:32]
    return op in (ARPOP_REQUEST, ARPOP_REPLY) and sender_ip == ip and sender_mac != own_mac
