#!/usr/bin/env python3
"""A static file server with HTTP Range support (single ranges), for tests.

Usage: range-http.py PORT DIR

Python's http.server answers a Range request with the whole file (200);
this one answers `Range: bytes=A-B` / `bytes=A-` with 206 and the bytes
asked for, 416 past the end, like nginx or a CDN. Listens on 127.0.0.1.
"""
import http.server
import io
import os
import re
import sys
from functools import partial


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    def send_head(self):
        asked = self.headers.get("Range")
        if not asked:
            return super().send_head()
        path = self.translate_path(self.path)
        try:
            f = open(path, "rb")
        except OSError:
            self.send_error(404)
            return None
        with f:
            size = os.fstat(f.fileno()).st_size
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", asked.strip())
            if not m:
                self.send_error(400)
                return None
            start = int(m[1])
            end = min(int(m[2]) if m[2] else size - 1, size - 1)
            if start >= size or end < start:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

    def log_message(self, *args):
        pass


def main():
    port, root = int(sys.argv[1]), sys.argv[2]
    handler = partial(RangeHandler, directory=root)
    http.server.ThreadingHTTPServer(("127.0.0.1", port), handler).serve_forever()


if __name__ == "__main__":
    main()
