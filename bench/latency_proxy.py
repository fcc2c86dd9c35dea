"""A TCP proxy on 127.0.0.1 that holds back the first byte of every response by N ms: a loopback object store
(SeaweedFS answers in about a millisecond) made to look like a real S3 region (20-80 ms to the first byte of
every GET), so a benchmark can show what first-byte latency costs the loader and what read-ahead wins back.

Per connection, each time the client sends bytes (a new request: keep-alive connections carry many), the next
data the server sends back is delayed by N ms; the rest of that response streams as it comes. It runs as its
own process so its copying does not share the loader's interpreter lock, and is stopped by its PID.

    .venv/bin/python bench/latency_proxy.py --upstream 127.0.0.1:8333 --delay-ms 50   # prints its port
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys

BUFFER = 1 << 20


async def _pipe_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict) -> None:
    """Client to server: every write arms the delay for the next answer."""
    try:
        while data := await reader.read(BUFFER):
            state["armed"] = True
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def _pipe_down(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict,
                     delay: float) -> None:
    """Server to client: the first data after a request waits ``delay`` seconds, the rest goes straight on."""
    try:
        while data := await reader.read(BUFFER):
            if state["armed"]:
                state["armed"] = False
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def _serve(upstream: tuple[str, int], port: int, delay: float) -> None:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*upstream)
        except OSError:
            client_writer.close()  # the store is down: the client sees a refused/reset connection, as without us
            return
        state = {"armed": False}
        await asyncio.gather(_pipe_up(client_reader, server_writer, state),
                             _pipe_down(server_reader, client_writer, state, delay), return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


class ProxyProcess:
    """A proxy script of bench/ as a child process: ``start()`` returns once it listens (it prints its port);
    ``stop()`` ends it by its PID. Every proxy here (latency, throttling) is driven this way."""

    def __init__(self, script: str, args: list[str]):
        self.script, self.args = script, args
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(self.script), *self.args],
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                     start_new_session=True)
        line = self.proc.stdout.readline()  # its port, once it listens ("" if it died)
        if not line.strip().isdigit():
            self.stop()
            name = os.path.basename(self.script)
            raise RuntimeError(f"{name} did not start (said {line!r}); run bench/{name} by hand")
        self.port = int(line)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # by PID
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LatencyProxy(ProxyProcess):
    """Every answer's first byte held back ``delay_ms``."""

    def __init__(self, upstream: str, delay_ms: float):
        super().__init__(__file__, ["--upstream", upstream, "--delay-ms", str(delay_ms)])
        self.upstream, self.delay_ms = upstream, delay_ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="host:port of the object store")
    p.add_argument("--delay-ms", type=float, required=True, help="hold back each response's first byte this long")
    p.add_argument("--port", type=int, default=0, help="port to listen on, 127.0.0.1 only (0: a free one)")
    args = p.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # nothing to flush: open connections just drop
    asyncio.run(_serve((host or "127.0.0.1", int(port)), args.port, args.delay_ms / 1000.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
