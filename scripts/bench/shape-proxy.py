#!/usr/bin/env python3
"""Userspace TCP proxy that shapes a link: added latency per request round
trip and a bandwidth limit, for benchmarks on a machine without netem.

Usage:
  shape-proxy.py --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT2
                 [--rate 100mbit] [--delay-ms 20] [--connect-delay-ms MS]
                 [--stats FILE] [--stats-interval S]
  shape-proxy.py --selftest

Shaping model (one link between every client and the upstream server):
  latency    every client->server burst is held for --delay-ms before it is
             forwarded, in order; bursts that arrive while earlier ones wait
             are not delayed further, so a pipelined HTTP request costs one
             round trip, N sequential request/response exchanges cost N.
             A new connection also costs one round trip (the TCP handshake):
             its first burst is forwarded no earlier than accept time +
             --connect-delay-ms (default: --delay-ms) + --delay-ms. The
             client->server EOF (half-close) is delayed like data.
  bandwidth  server->client bytes pass a token bucket shared by all
             connections (a FIFO link of --rate bit/s with a 10 ms burst);
             client->server bytes are not limited. --rate 0 = unlimited.
             Units: bit, kbit, mbit, gbit (SI, as tc), or a plain number of
             bit/s; kbps/mbps/gbps are bytes/s (as tc).
  Half-close is passed through; a reset or error on either side aborts
  both sides of that connection only.

Stats (JSON): connections, active, max_active, bytes_c2s, bytes_s2c,
resets, connect_errors, elapsed_s, ...; written to --stats FILE (atomically)
every --stats-interval seconds, on SIGUSR1, and on SIGTERM/SIGINT (then
with "final": true, and the proxy exits 0). Without --stats the final stats
go to stdout. When listening, the proxy prints its address on stdout
(PORT 0 picks a free port).

--selftest runs the proxy against in-process servers and checks its own
shaping (10 MB at 100 Mbit/s ~0.8 s; 10 sequential round trips at 20 ms
>= 200 ms; a pipelined burst ~1 round trip; the rate shared by concurrent
connections; half-close; resets; 200 concurrent connections; byte counts).
Exits non-zero if a timing is off by more than 20% or a check fails.
"""
import argparse
import asyncio
import json
import os
import re
import resource
import signal
import socket
import struct
import sys
import threading
import time

S2C_CHUNK_SHAPED = 16 * 1024   # small reads keep the link interleaved fairly
S2C_CHUNK_FREE = 256 * 1024
C2S_CHUNK = 64 * 1024
C2S_QUEUE = 64                 # bursts buffered per connection (backpressure)
BURST_S = 0.010                # token bucket depth, in seconds of the rate


def parse_rate(s):
    """'100mbit' -> bytes per second (float); 0 = unlimited."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"bad rate {s!r}")
    v, unit = float(m.group(1)), m.group(2).lower()
    bits = {"": 1, "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9,
            "k": 1e3, "m": 1e6, "g": 1e9}
    byts = {"kbps": 1e3, "mbps": 1e6, "gbps": 1e9, "bps": 1}
    if unit in bits:
        return v * bits[unit] / 8
    if unit in byts:
        return v * byts[unit]
    raise argparse.ArgumentTypeError(f"bad rate unit {unit!r} in {s!r}")


def parse_addr(s):
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"want HOST:PORT, got {s!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class Link:
    """A FIFO link of `rate` bytes/s shared by every connection: each send
    is scheduled after everything sent before it (virtual finish time),
    with up to BURST_S of credit so that timer overshoot is not lost."""

    def __init__(self, rate):
        self.rate = rate
        self.next_free = 0.0

    async def send(self, n):
        if self.rate <= 0:
            return
        now = time.monotonic()
        start = max(self.next_free, now - BURST_S)
        self.next_free = start + n / self.rate
        wait = self.next_free - now
        if wait > 0:
            await asyncio.sleep(wait)


class Proxy:
    def __init__(self, listen, upstream, rate, delay, connect_delay):
        self.listen, self.upstream = listen, upstream
        self.rate, self.delay, self.connect_delay = rate, delay, connect_delay
        self.link = Link(rate)
        self.server = None
        self.tasks = set()
        self.t0 = time.time()
        self.st = dict(connections=0, active=0, max_active=0, bytes_c2s=0,
                       bytes_s2c=0, resets=0, connect_errors=0, closed=0)

    def stats(self, final=False):
        d = dict(listen="%s:%d" % self.listen, upstream="%s:%d" % self.upstream,
                 rate_bits=self.rate * 8, delay_ms=self.delay * 1e3,
                 connect_delay_ms=self.connect_delay * 1e3, pid=os.getpid(),
                 started=self.t0, elapsed_s=round(time.time() - self.t0, 3))
        d.update(self.st)
        d["final"] = final
        return d

    async def start(self):
        self.server = await asyncio.start_server(
            self.handle, self.listen[0], self.listen[1], backlog=1024,
            reuse_address=True, limit=256 * 1024)
        self.listen = self.server.sockets[0].getsockname()[:2]
        return self.listen

    async def handle(self, creader, cwriter):
        task = asyncio.current_task()
        self.tasks.add(task)
        accepted = time.monotonic()
        st = self.st
        st["connections"] += 1
        st["active"] += 1
        st["max_active"] = max(st["max_active"], st["active"])
        uwriter = None
        try:
            try:
                ureader, uwriter = await asyncio.open_connection(
                    self.upstream[0], self.upstream[1], limit=256 * 1024)
            except OSError:
                st["connect_errors"] += 1
                abort(cwriter)
                return
            for w in (cwriter, uwriter):
                s = w.get_extra_info("socket")
                if s is not None:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c2s = asyncio.ensure_future(self.pump_c2s(creader, uwriter, accepted))
            s2c = asyncio.ensure_future(self.pump_s2c(ureader, cwriter))
            pending = {c2s, s2c}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                errors = [t.exception() for t in done]   # retrieve every one
                if any(e is not None for e in errors):
                    # reset/error on one side: abort both sides, stop the other pump
                    st["resets"] += 1
                    abort(cwriter)
                    abort(uwriter)
                    for t in pending:
                        t.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    return
            close(cwriter)
            close(uwriter)
        except asyncio.CancelledError:
            abort(cwriter)
            if uwriter is not None:
                abort(uwriter)
            raise
        finally:
            st["active"] -= 1
            st["closed"] += 1
            self.tasks.discard(task)

    async def pump_c2s(self, reader, writer, accepted):
        """client -> server: every burst held `delay` (after the handshake
        round trip for the first), in order; EOF delayed the same way."""
        if self.delay <= 0 and self.connect_delay <= 0:
            while True:
                b = await reader.read(C2S_CHUNK)
                if not b:
                    break
                self.st["bytes_c2s"] += len(b)
                writer.write(b)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            return
        q = asyncio.Queue(C2S_QUEUE)
        not_before = accepted + self.connect_delay

        async def feed():
            while True:
                b = await reader.read(C2S_CHUNK)
                due = max(time.monotonic(), not_before) + self.delay
                if not b:
                    await q.put((due, None))
                    return
                self.st["bytes_c2s"] += len(b)
                await q.put((due, b))

        feeder = asyncio.ensure_future(feed())
        try:
            while True:
                get = asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({get, feeder}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    # the feeder ended: an exception (reset) ends us too
                    if feeder.exception() is not None:
                        get.cancel()
                        raise feeder.exception()
                    await get
                due, b = get.result()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if b is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(b)
                await writer.drain()
        finally:
            if not feeder.done():
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)

    async def pump_s2c(self, reader, writer):
        """server -> client through the shared link."""
        chunk = S2C_CHUNK_SHAPED if self.rate > 0 else S2C_CHUNK_FREE
        while True:
            b = await reader.read(chunk)
            if not b:
                break
            await self.link.send(len(b))
            writer.write(b)
            self.st["bytes_s2c"] += len(b)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def close_all(self):
        if self.server is not None:
            self.server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def abort(w):
    """Close now; the peer gets a reset (SO_LINGER 0), as from a real link."""
    try:
        s = w.get_extra_info("socket")
        if s is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        w.transport.abort()
    except Exception:
        pass


def close(w):
    try:
        w.close()
    except Exception:
        pass


def write_json(path, d):
    if path is None:
        print(json.dumps(d), flush=True)
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(d, f)
        f.write("\n")
    os.replace(tmp, path)


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(args):
    raise_nofile()
    cd = args.delay_ms if args.connect_delay_ms is None else args.connect_delay_ms
    p = Proxy(args.listen, args.upstream, args.rate, args.delay_ms / 1e3, cd / 1e3)
    addr = await p.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.stats:
        loop.add_signal_handler(signal.SIGUSR1, lambda: write_json(args.stats, p.stats()))
        write_json(args.stats, p.stats())
    print("%s:%d" % addr, flush=True)

    async def periodic():
        while True:
            await asyncio.sleep(args.stats_interval)
            write_json(args.stats, p.stats())

    per = asyncio.ensure_future(periodic()) if args.stats else None
    await stop.wait()
    if per:
        per.cancel()
    # stats first: the bytes that passed are what counts
    write_json(args.stats, p.stats(final=True))
    await p.close_all()


# ------------------------------------------------------------------ selftest

class Servers:
    """Test servers on 127.0.0.1, in the proxy's event loop.
    Protocol (one line per request): 'bulk N' -> N bytes then close;
    'ping' -> 'pong'; 'echo' -> echo everything until EOF, then close;
    'reset N' -> N bytes then RST."""

    async def start(self):
        self.srv = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.srv.sockets[0].getsockname()[:2]

    async def handle(self, r, w):
        try:
            while True:
                line = await r.readline()
                if not line:
                    break
                cmd = line.split()
                if cmd[0] == b"bulk":
                    n = int(cmd[1])
                    buf = b"x" * (1 << 20)
                    while n > 0:
                        w.write(buf[:min(n, len(buf))])
                        n -= min(n, len(buf))
                        await w.drain()
                    break
                if cmd[0] == b"ping":
                    w.write(b"pong\n")
                    await w.drain()
                elif cmd[0] == b"echo":
                    while True:
                        b = await r.read(65536)
                        if not b:
                            break
                        w.write(b)
                        await w.drain()
                    break
                elif cmd[0] == b"reset":
                    w.write(b"y" * int(cmd[1]))
                    await w.drain()
                    s = w.get_extra_info("socket")
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    w.transport.abort()
                    return
            if w.can_write_eof():
                w.write_eof()
            await w.drain()
            w.close()
        except (ConnectionError, OSError):
            w.transport.abort()


def selftest():
    raise_nofile()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    up = run(Servers().start())

    def proxy(rate, delay_ms, connect_delay_ms=None):
        cd = delay_ms if connect_delay_ms is None else connect_delay_ms

        async def mk():
            p = Proxy(("127.0.0.1", 0), up, parse_rate(rate), delay_ms / 1e3, cd / 1e3)
            await p.start()
            return p
        return run(mk())

    def conn(p):
        s = socket.create_connection(p.listen)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def recv_all(s):
        n = 0
        while True:
            b = s.recv(1 << 20)
            if not b:
                return n
            n += len(b)

    def recv_line(s):
        buf = b""
        while not buf.endswith(b"\n"):
            b = s.recv(100)
            if not b:
                raise EOFError
            buf += b
        return buf

    failures = []

    def check(name, ok, detail):
        print(f"selftest: {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if not ok:
            failures.append(name)

    def near(name, got, want, tol=0.2):
        check(name, abs(got - want) <= tol * want, f"{got:.3f} s (want {want:.3f} s +-{tol:.0%})")

    # 1. bandwidth: 10 MB at 100 Mbit/s = 0.8 s (no delay)
    p = proxy("100mbit", 0)
    s = conn(p)
    t0 = time.monotonic()
    s.sendall(b"bulk 10000000\n")
    n = recv_all(s)
    dt = time.monotonic() - t0
    s.close()
    check("bulk bytes", n == 10_000_000, f"{n} bytes")
    near("10 MB at 100mbit", dt, 0.8)

    # 2. latency: 10 sequential round trips at 20 ms (the handshake round
    # trip excluded: connect-delay 0 here, measured separately below)
    p = proxy("100mbit", 20, connect_delay_ms=0)
    s = conn(p)
    t0 = time.monotonic()
    for _ in range(10):
        s.sendall(b"ping\n")
        assert recv_line(s) == b"pong\n"
    dt = time.monotonic() - t0
    check("10 round trips >= 200 ms", dt >= 0.200, f"{dt * 1e3:.0f} ms")
    near("10 round trips at 20 ms", dt, 0.200)
    # pipelined: 10 requests in one burst cost one round trip
    t0 = time.monotonic()
    s.sendall(b"ping\n" * 10)
    got = b""
    while got.count(b"\n") < 10:
        got += s.recv(100)
    dt = time.monotonic() - t0
    s.close()
    near("10 pipelined requests = 1 round trip", dt, 0.020)

    # 3. handshake: a new connection's first request costs 2 round trips
    p = proxy("0", 20)
    t0 = time.monotonic()
    s = conn(p)
    s.sendall(b"ping\n")
    recv_line(s)
    dt = time.monotonic() - t0
    s.close()
    near("connect + first request = 2 round trips", dt, 0.040)

    # 4. the rate is shared: 4 connections x 2.5 MB at 100 Mbit/s = 0.8 s
    p = proxy("100mbit", 0)
    socks = [conn(p) for _ in range(4)]
    res = [0] * 4
    t0 = time.monotonic()

    def get(i):
        socks[i].sendall(b"bulk 2500000\n")
        res[i] = recv_all(socks[i])
    th = [threading.Thread(target=get, args=(i,)) for i in range(4)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    dt = time.monotonic() - t0
    for x in socks:
        x.close()
    check("shared-link bytes", res == [2_500_000] * 4, str(res))
    near("4 x 2.5 MB at 100mbit (shared)", dt, 0.8)

    # 5. half-close: client sends, shuts down its side, still gets the echo
    p = proxy("100mbit", 5)
    s = conn(p)
    payload = os.urandom(300_000)
    s.sendall(b"echo\n" + payload)
    s.shutdown(socket.SHUT_WR)
    got = bytearray()
    while True:
        b = s.recv(1 << 16)
        if not b:
            break
        got += b
    s.close()
    check("half-close echo", bytes(got) == payload, f"{len(got)} of {len(payload)} bytes back")

    # 6. resets: the server resets mid-stream; the client sees the end of
    # the stream (reset or EOF), the proxy carries on
    p = proxy("0", 0)
    s = conn(p)
    s.sendall(b"reset 100000\n")
    n, err = 0, None
    try:
        n = recv_all(s)
    except ConnectionResetError as e:
        err = e
    s.close()
    check("server reset passed on", n <= 100000, f"{n} bytes, {type(err).__name__ if err else 'EOF'}")
    # client resets mid-download
    s = conn(p)
    s.sendall(b"bulk 50000000\n")
    s.recv(1000)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    deadline = time.monotonic() + 5
    while p.st["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    check("client reset cleaned up", p.st["active"] == 0 and p.st["resets"] >= 1,
          f"active {p.st['active']}, resets {p.st['resets']}")
    s = conn(p)
    s.sendall(b"ping\n")
    check("proxy still serves after resets", recv_line(s) == b"pong\n", "pong")
    s.close()
    # upstream down: the client is dropped, the error counted
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_addr = dead.getsockname()
    dead.close()

    async def mkdead():
        q = Proxy(("127.0.0.1", 0), dead_addr, 0, 0, 0)
        await q.start()
        return q
    q = run(mkdead())
    s = conn(q)
    try:
        s.sendall(b"ping\n")
        b = s.recv(100)
    except ConnectionError:
        b = b""
    s.close()
    check("upstream down -> client dropped", b == b"" and q.st["connect_errors"] == 1,
          f"connect_errors {q.st['connect_errors']}")

    # 7. many concurrent connections, each an echo of 20 KB
    p = proxy("100mbit", 2)
    N = 200
    ok = [False] * N

    def one(i):
        try:
            s = conn(p)
            data = os.urandom(20_000)
            s.sendall(b"echo\n" + data)
            s.shutdown(socket.SHUT_WR)
            got = bytearray()
            while True:
                b = s.recv(65536)
                if not b:
                    break
                got += b
            s.close()
            ok[i] = bytes(got) == data
        except OSError:
            ok[i] = False
    t0 = time.monotonic()
    th = [threading.Thread(target=one, args=(i,)) for i in range(N)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    dt = time.monotonic() - t0
    deadline = time.monotonic() + 5
    while p.st["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    check(f"{N} concurrent echo connections", all(ok) and p.st["max_active"] > 1,
          f"{sum(ok)} ok, max_active {p.st['max_active']}, {dt:.2f} s")
    want_c2s = N * (5 + 20_000)
    check("byte counts", p.st["bytes_c2s"] == want_c2s and p.st["bytes_s2c"] == N * 20_000
          and p.st["connections"] == N and p.st["active"] == 0,
          f"c2s {p.st['bytes_c2s']} (want {want_c2s}), s2c {p.st['bytes_s2c']}, "
          f"connections {p.st['connections']}, active {p.st['active']}")

    # 8. unlimited: 100 MB must not be throttled (sanity: > 100 MB/s)
    p = proxy("0", 0)
    s = conn(p)
    t0 = time.monotonic()
    s.sendall(b"bulk 100000000\n")
    n = recv_all(s)
    dt = time.monotonic() - t0
    s.close()
    check("rate 0 = unlimited", n == 100_000_000 and n / dt > 100e6, f"{n / dt / 1e6:.0f} MB/s")

    if failures:
        print(f"selftest: {len(failures)} FAILED: {', '.join(failures)}", flush=True)
        return 1
    print("selftest: all passed", flush=True)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", type=parse_addr, help="HOST:PORT to listen on (PORT 0: any free)")
    ap.add_argument("--upstream", type=parse_addr, help="HOST:PORT to forward to")
    ap.add_argument("--rate", type=parse_rate, default=0.0,
                    help="server->client rate, e.g. 100mbit (0 = unlimited; default 0)")
    ap.add_argument("--delay-ms", type=float, default=0.0,
                    help="added per request round trip (default 0)")
    ap.add_argument("--connect-delay-ms", type=float, default=None,
                    help="added for a new connection's handshake (default: --delay-ms)")
    ap.add_argument("--stats", help="write JSON stats to this file")
    ap.add_argument("--stats-interval", type=float, default=1.0,
                    help="seconds between --stats writes (default 1)")
    ap.add_argument("--selftest", action="store_true", help="measure own shaping and exit")
    args = ap.parse_args()
    if args.selftest:
        sys.exit(selftest())
    if args.listen is None or args.upstream is None:
        ap.error("--listen and --upstream are required (or --selftest)")
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
