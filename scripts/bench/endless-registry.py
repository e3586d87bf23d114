#!/usr/bin/env python3
"""A hostile registry on 127.0.0.1 for scripts/bench-hostile.sh: `GET /v2/`
answers `{}`, every other request a 200 whose body (no Content-Length)
never ends. Prints the port, then serves until killed; each endless answer
started is logged on stderr as `endless N PATH`."""
import socket
import sys
import threading

count = 0
lock = threading.Lock()


def serve(conn):
    global count
    with conn:
        f = conn.makefile("rb")
        first = f.readline().decode("latin-1")
        while f.readline() not in (b"\r\n", b"\n", b""):
            pass
        if first.startswith("GET /v2/ "):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                         b"Content-Type: application/json\r\n\r\n{}")
            return
        with lock:
            count += 1
            print(f"endless {count} {first.split(' ')[1]}", file=sys.stderr, flush=True)
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: "
                     b"application/vnd.oci.image.manifest.v1+json\r\n\r\n{\"a\":\"")
        block = b"x" * 65536
        try:
            while True:
                conn.sendall(block)
        except OSError:
            pass


def main():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    print(s.getsockname()[1], flush=True)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
