"""A TCP proxy that delays every chunk by a fixed time in both directions, order preserved.

This kernel has no netem, so latency is added in userspace: each chunk read from one side
is written to the other `--delay-ms` after it arrived (a reader and a writer per direction,
so the delay adds latency without limiting throughput). The event loop runs on select(),
not epoll: epoll's timeouts are whole milliseconds, which would turn 0.5 ms into ~1.1 ms;
select() keeps microseconds. Measure the round trip you get all the same.

    python tests/bench/delay_proxy.py LISTEN_HOST:PORT TARGET_HOST:PORT --delay-ms 0.5

Prints `ready` once listening; on SIGTERM prints the bytes carried each way as JSON and
exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import selectors
import signal
import socket
import sys

CHUNK = 1 << 20
QUEUE_CHUNKS = 256  # in flight per direction before the reader waits (back-pressure)


class Counters:
    """Bytes carried towards the target (up) and back (down), over every connection."""

    def __init__(self) -> None:
        self.up = 0
        self.down = 0
        self.connections = 0


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay: float,
    count: list[int],
) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

    async def read() -> None:
        while data := await reader.read(CHUNK):
            await queue.put((loop.time() + delay, data))
        await queue.put((loop.time() + delay, b""))

    async def write() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            count[0] += len(data)
            await writer.drain()

    reading = asyncio.ensure_future(read())
    try:
        await write()
    finally:
        reading.cancel()
        with contextlib.suppress(BaseException):
            await reading


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _serve(
    listen: tuple[str, int], target: tuple[str, int], delay: float, counters: Counters
) -> None:
    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        counters.connections += 1
        try:
            t_reader, t_writer = await asyncio.open_connection(*target)
        except (OSError, asyncio.CancelledError):
            c_writer.close()
            return
        _nodelay(c_writer)
        _nodelay(t_writer)
        up, down = [0], [0]
        tasks = [
            asyncio.ensure_future(_pump(c_reader, t_writer, delay, up)),
            asyncio.ensure_future(_pump(t_reader, c_writer, delay, down)),
        ]
        try:
            # Either side closing ends the connection (a replication stream is all or nothing).
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass  # the proxy stops: end quietly (a cancelled handler is logged as an error)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            counters.up += up[0]
            counters.down += down[0]
            for w in (c_writer, t_writer):
                w.close()

    server = await asyncio.start_server(handle, *listen, reuse_address=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: give HOST:PORT, e.g. 127.0.0.1:7702")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("listen", type=_address, help="HOST:PORT to listen on")
    parser.add_argument("target", type=_address, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, default=0.5, help="delay each way (ms)")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error(f"--delay-ms {args.delay_ms}: give 0 or more")
    counters = Counters()
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        loop.run_until_complete(_serve(args.listen, args.target, args.delay_ms / 1000.0, counters))
    except OSError as exc:
        print(f"cannot listen on {args.listen[0]}:{args.listen[1]}: {exc}", flush=True)
        return 1
    finally:
        loop.close()
    report = {"up": counters.up, "down": counters.down, "connections": counters.connections}
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
