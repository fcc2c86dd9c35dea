"""An HTTP proxy on 127.0.0.1 in front of a loopback object store that throttles like a busy S3 prefix: the first
N requests (after any it lets through first; only those whose request line holds ``--match``, if given) are answered ``503 SlowDown`` (or ``429 Too Many Requests``) with a
``Retry-After`` header, and every later one goes to the store. Many workers hammering one prefix of a real bucket
get exactly these answers; SeaweedFS on loopback never gives them, so the throttling tests and the chaos bench
put this in front of it.

It reads each request (head and Content-Length body) so it can answer it whole on a kept-alive connection; a
request it passes on goes to the store on a fresh connection with ``Connection: close``, and the store's answer
is copied back to the client, which then closes that connection as the answer says. It runs as its own process
(stopped by its PID) and appends one line per throttled request to ``--log`` so a test can count them.

    .venv/bin/python bench/throttle_proxy.py --upstream 127.0.0.1:8333 --throttle 40 --status 503 --retry-after 1
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from latency_proxy import ProxyProcess  # bench/ is on the path: as a script, or as the tests import it

BUFFER = 1 << 20
BODIES = {503: (b"SlowDown", b"Please reduce your request rate."),
          429: (b"TooManyRequests", b"Too many requests, please slow down.")}


def throttled_answer(status: int, retry_after: float, request_id: int, head_only: bool = False) -> bytes:
    """An S3 error answer, as S3 sends SlowDown: an XML body with the code, and Retry-After in seconds (the answer
    to a HEAD request has the headers only, as HTTP says)."""
    code, message = BODIES[status]
    body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>' + code + b"</Code><Message>" + message +
            b"</Message><RequestId>" + str(request_id).encode() + b"</RequestId></Error>")
    reason = b"Slow Down" if status == 503 else b"Too Many Requests"
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: application/xml\r\nContent-Length: %d\r\nRetry-After: %s\r\n"
            b"x-amz-request-id: %d\r\nConnection: keep-alive\r\n\r\n"
            % (status, reason, len(body), f"{retry_after:g}".encode(), request_id))
    return head if head_only else head + body


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request, head and body (Content-Length), or None when the client closed the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return head + body


def _closing(request: bytes) -> bytes:
    """The request with ``Connection: close``, so the store's answer ends where its connection does."""
    head, _, body = request.partition(b"\r\n\r\n")
    lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
    return b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + body


class _Throttle:
    def __init__(self, after: int, count: int, status: int, retry_after: float, log: str, match: str = ""):
        self.after, self.left, self.status, self.retry_after, self.log = after, count, status, retry_after, log
        self.match = match.encode()
        self.seen = 0

    def take(self, request: bytes) -> bool:
        """Whether this request is throttled (the proxy is one event loop: no lock needed). Only requests whose
        request line holds ``match`` count."""
        if self.match not in request.split(b"\r\n", 1)[0]:
            return False
        self.seen += 1
        if self.seen <= self.after or self.left <= 0:
            return False
        self.left -= 1
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{self.status} {self.seen}\n")
        return True


async def _serve(upstream: tuple[str, int], port: int, throttle: _Throttle) -> None:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            while (request := await _read_request(client_reader)) is not None:
                if throttle.take(request):
                    client_writer.write(throttled_answer(throttle.status, throttle.retry_after, throttle.seen,
                                                         head_only=request.startswith(b"HEAD ")))
                    await client_writer.drain()
                    continue
                try:
                    server_reader, server_writer = await asyncio.open_connection(*upstream)
                except OSError:
                    return  # the store is down: the client sees its connection closed, as without us
                server_writer.write(_closing(request))
                await server_writer.drain()
                while data := await server_reader.read(BUFFER):
                    client_writer.write(data)
                    await client_writer.drain()
                server_writer.close()
                return  # the answer said Connection: close
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            client_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


class ThrottleProxy(ProxyProcess):
    """``throttled()`` counts the requests it answered with a throttle so far."""

    def __init__(self, upstream: str, throttle: int, status: int = 503, retry_after: float = 1.0, after: int = 0,
                 log: str = "", match: str = ""):
        super().__init__(__file__, ["--upstream", upstream, "--throttle", str(throttle), "--status", str(status),
                                    "--retry-after", str(retry_after), "--after", str(after), "--log", log,
                                    "--match", match])
        self.log = log

    def throttled(self) -> int:
        if not self.log or not os.path.exists(self.log):
            return 0
        with open(self.log) as f:
            return sum(1 for _ in f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="host:port of the object store")
    p.add_argument("--throttle", type=int, required=True, help="requests to answer with a throttle")
    p.add_argument("--status", type=int, choices=sorted(BODIES), default=503, help="503 SlowDown or 429")
    p.add_argument("--retry-after", type=float, default=1.0, help="the Retry-After header's seconds")
    p.add_argument("--after", type=int, default=0, help="requests to let through before throttling starts")
    p.add_argument("--log", default="", help="append one line per throttled request here")
    p.add_argument("--match", default="", help="only requests whose request line holds this (e.g. .tar: shard reads)")
    p.add_argument("--port", type=int, default=0, help="port to listen on, 127.0.0.1 only (0: a free one)")
    args = p.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    throttle = _Throttle(args.after, args.throttle, args.status, args.retry_after, args.log, args.match)
    asyncio.run(_serve((host or "127.0.0.1", int(port)), args.port, throttle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
