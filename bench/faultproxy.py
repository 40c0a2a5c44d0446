"""A fault-injecting HTTP proxy between the service and its S3-protocol server.

It runs on its own thread and event loop (so sync test code and benchmarks drive it with plain
attribute writes and method calls) and handles one request per client connection: the request
is read whole, faults are applied, the request goes upstream with `Connection: close` and the
response comes back with `Connection: close`. Faults, each switchable at any time:

- `latency_s`: added before every request is forwarded (slow storage);
- `fail_fraction` of requests (seeded) fail as one of `fail_kinds`:
  `error_503`   answered `503 SlowDown` without reaching the store,
  `drop_before` connection closed without reaching the store,
  `drop_after`  forwarded and executed upstream, then closed without an answer (an ambiguous
                write: the client cannot tell whether it landed),
  `truncate`    head and half the body forwarded, then both sides closed (a half-sent write);
- `set_down(True)`: the listener closes and in-flight connections are cut (connection refused);
- `stall()`: every request waits until `unstall()` (a hung store);
- `hold(method, path_regex, after=...)`: the first matching request stops before it is
  forwarded (or after the store executed it, before the answer) until released; `arrived` is a
  `threading.Event`, so a test can kill a process at exactly that point.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import threading
from collections import Counter
from dataclasses import dataclass, field

FAIL_KINDS = ("error_503", "drop_before", "drop_after", "truncate")
_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>injected by faultproxy</Message></Error>"
)
_MAX_HEAD = 64 * 1024


class _Cut(Exception):
    """The connection is to be closed without an answer."""


@dataclass
class Hold:
    """One armed stop point; `arrived` is set when a matching request reaches it."""

    method: str
    path: re.Pattern[str]
    after: bool
    arrived: threading.Event = field(default_factory=threading.Event)
    matched: str | None = None
    _release: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def release(self) -> None:
        if self._loop is not None and self._release is not None:
            self._loop.call_soon_threadsafe(self._release.set)


@dataclass
class _Request:
    method: str
    target: str
    head_lines: list[bytes]
    body: bytes

    def encode_head(self) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/1.1".encode()]
        lines += [h for h in self.head_lines if not h.lower().startswith(b"connection:")]
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n"


def _header(lines: list[bytes], name: bytes) -> bytes | None:
    prefix = name.lower() + b":"
    for line in lines:
        if line.lower().startswith(prefix):
            return line[len(prefix) :].strip()
    return None


async def _read_body(
    reader: asyncio.StreamReader, lines: list[bytes], *, until_eof: bool = False
) -> bytes:
    """The message body as framed on the wire (Content-Length or chunked, kept as sent); a
    response with neither ends at EOF (`until_eof`), a request with neither has no body."""
    length = _header(lines, b"content-length")
    if length is not None:
        return await reader.readexactly(int(length))
    if (_header(lines, b"transfer-encoding") or b"").lower() == b"chunked":
        out = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            out += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers end with an empty line
                    trailer = await reader.readuntil(b"\r\n")
                    out += trailer
                    if trailer == b"\r\n":
                        return bytes(out)
            out += await reader.readexactly(size + 2)
    return await reader.read() if until_eof else b""


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, list[bytes]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    if len(raw) > _MAX_HEAD:
        raise _Cut("head too large")
    first, *lines = raw[:-4].split(b"\r\n")
    return first, lines


class FaultProxy:
    """Forward HTTP from `endpoint` to `upstream` ("http://host:port"), injecting faults."""

    def __init__(self, upstream: str, *, host: str = "127.0.0.1", port: int = 0, seed: int = 0):
        m = re.match(r"^http://([^:/]+):(\d+)/?$", upstream)
        if m is None:
            raise ValueError(f"upstream must look like http://host:port, got {upstream!r}")
        self.upstream_host, self.upstream_port = m.group(1), int(m.group(2))
        self.host = host
        self.port = port
        self.latency_s = 0.0
        self.fail_fraction = 0.0
        self.fail_kinds: tuple[str, ...] = FAIL_KINDS
        # Only requests whose path matches are failed (None: every request).
        self.fail_paths: re.Pattern[str] | None = None
        self.stats: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._holds: list[Hold] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._unstalled: asyncio.Event | None = None
        self._ready = threading.Event()
        self._down = False

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- control (any thread) ---------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro_fn: object) -> None:
        assert self._loop is not None, "proxy not started"
        asyncio.run_coroutine_threadsafe(coro_fn, self._loop).result(10)  # type: ignore[arg-type]

    def set_down(self, down: bool) -> None:
        """Down: connections are refused and in-flight ones cut; up: listening again."""
        self._call(self._set_down(down))

    @property
    def down(self) -> bool:
        return self._down

    def stall(self) -> None:
        """Every request (new and waiting) waits until unstall()."""
        assert self._loop is not None and self._unstalled is not None
        self._loop.call_soon_threadsafe(self._unstalled.clear)

    def unstall(self) -> None:
        assert self._loop is not None and self._unstalled is not None
        self._loop.call_soon_threadsafe(self._unstalled.set)

    def hold(self, method: str, path_regex: str, *, after: bool = False) -> Hold:
        """Stop the first request matching `method` and `path_regex` (searched in the path)."""
        h = Hold(method.upper(), re.compile(path_regex), after)
        with self._lock:
            self._holds.append(h)
        return h

    def clear_faults(self) -> None:
        self.latency_s = 0.0
        self.fail_fraction = 0.0
        self.fail_paths = None

    # -- proxy loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._unstalled = asyncio.Event()
        self._unstalled.set()
        loop.run_until_complete(self._listen())
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _set_down(self, down: bool) -> None:
        if down and not self._down:
            self._down = True
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None
            for w in list(self._conns):
                w.transport.abort()
        elif not down and self._down:
            await self._listen()
            self._down = False

    async def _shutdown(self) -> None:
        if self._unstalled is not None:
            self._unstalled.set()
        with self._lock:
            for h in self._holds:
                if h._release is not None:
                    h._release.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for w in list(self._conns):
            w.transport.abort()

    def _take_hold(self, req: _Request) -> Hold | None:
        path = req.target.split("?", 1)[0]
        with self._lock:
            for h in self._holds:
                if h.method == req.method and h.path.search(path):
                    self._holds.remove(h)
                    h.matched = f"{req.method} {path}"
                    h._loop = self._loop
                    h._release = asyncio.Event()
                    return h
        return None

    def _pick_fault(self, req: _Request) -> str | None:
        if self.fail_fraction <= 0.0:
            return None
        pattern = self.fail_paths
        if pattern is not None and not pattern.search(req.target.split("?", 1)[0]):
            return None
        with self._lock:
            if self._rng.random() >= self.fail_fraction:
                return None
            return self._rng.choice(self.fail_kinds)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            await self._serve_one(reader, writer)
        except (_Cut, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self._conns.discard(writer)
            writer.transport.abort()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first, lines = await _read_head(reader)
        method, target, _ = first.decode("latin-1").split(" ", 2)
        if (_header(lines, b"expect") or b"").lower() == b"100-continue":
            # The client waits for this before it sends the body; upstream never sees the Expect.
            lines = [h for h in lines if not h.lower().startswith(b"expect:")]
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        req = _Request(method.upper(), target, lines, await _read_body(reader, lines))
        self.stats["requests"] += 1
        hold = self._take_hold(req)
        assert self._unstalled is not None
        await self._unstalled.wait()
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        if hold is not None and not hold.after:
            await self._wait_hold(hold)
        fault = self._pick_fault(req)
        if fault is not None:
            self.stats[fault] += 1
        if fault == "error_503":
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(_SLOWDOWN)}\r\nConnection: close\r\n\r\n".encode()
                + _SLOWDOWN
            )
            await writer.drain()
            return
        if fault == "drop_before":
            raise _Cut(fault)
        response = await self._forward(req, truncate=fault == "truncate")
        if hold is not None and hold.after:
            await self._wait_hold(hold)
        if fault in ("drop_after", "truncate"):
            raise _Cut(fault)
        writer.write(response)
        await writer.drain()
        self.stats["forwarded"] += 1

    async def _wait_hold(self, hold: Hold) -> None:
        assert hold._release is not None
        hold.arrived.set()
        await hold._release.wait()

    async def _forward(self, req: _Request, *, truncate: bool) -> bytes:
        up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        try:
            up_writer.write(req.encode_head())
            if truncate:
                up_writer.write(req.body[: len(req.body) // 2])
                await up_writer.drain()
                raise _Cut("truncate")
            up_writer.write(req.body)
            await up_writer.drain()
            status, lines = await _read_head(up_reader)
            code = int(status.split(b" ", 2)[1])
            no_body = req.method == "HEAD" or code in (204, 304) or 100 <= code < 200
            body = b"" if no_body else await _read_body(up_reader, lines, until_eof=True)
        finally:
            up_writer.transport.abort()
        out = [status, *(h for h in lines if not h.lower().startswith(b"connection:"))]
        out.append(b"Connection: close")
        return b"\r\n".join(out) + b"\r\n\r\n" + body


def main() -> None:
    """`python -m bench.faultproxy UPSTREAM [PORT]`: a plain pass-through, for manual poking."""
    import sys
    import time

    proxy = FaultProxy(sys.argv[1], port=int(sys.argv[2]) if len(sys.argv) > 2 else 0).start()
    sys.stderr.write(f"faultproxy {proxy.endpoint} -> {sys.argv[1]}\n")
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
