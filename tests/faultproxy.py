"""A small HTTP proxy in front of a real object-storage server, for fault tests: it
answers a share of requests with 503 SlowDown, cuts a share of responses mid-body with a
TCP reset, or is gone (its port closed: connection refused) for a while or for good.
It runs as its own process (a test must not share its GIL with the code under test):

    python -m tests.faultproxy --upstream 127.0.0.1:PORT --ports-file F
    # F gets {"port": P, "control": C}; clients talk to 127.0.0.1:P

Control (its own port C, so it answers while the data port is gone):
    POST /faults {"slowdown": 0.1, "reset": 0.2, "reset_after": 65536}   shares of GETs, bytes before a reset
    POST /down {"seconds": 20}        the data port closed for 20 s ({"seconds": -1}: for good)
    GET  /stats                       {"requests", "gets", "slowdowns", "resets", "refused_s"}
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

S3_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your '
               b'request rate.</Message></Error>')
GCS_503 = b'{"error": {"code": 503, "message": "Backend Error", "errors": [{"reason": "backendError"}]}}'


class State:
    def __init__(self, upstream: str):
        self.upstream = upstream
        self.slowdown = self.reset = 0.0
        self.reset_after = 65536
        self.stats = {"requests": 0, "gets": 0, "slowdowns": 0, "resets": 0, "down_since": None}
        self.lock = threading.Lock()
        self.rng = random.Random(1234)

    def roll(self, share: float) -> bool:
        with self.lock:
            return self.rng.random() < share


def _read_request(f) -> tuple[str, dict, bytes] | None:
    line = f.readline(65537)
    if not line:
        return None
    headers, raw = {}, [line]
    while True:
        h = f.readline(65537)
        raw.append(h)
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    body = f.read(int(headers.get("content-length", 0) or 0))
    return line.decode("latin-1"), headers, b"".join(raw) + body


def _serve(conn: socket.socket, st: State) -> None:
    """One client connection, request after request (keep-alive)."""
    f = conn.makefile("rb")
    up_host, up_port = st.upstream.rsplit(":", 1)
    try:
        while True:
            req = _read_request(f)
            if req is None:
                return
            line, headers, raw = req
            method, path = line.split()[:2]
            with st.lock:
                st.stats["requests"] += 1
                st.stats["gets"] += method == "GET"
            if method == "GET" and st.roll(st.slowdown):
                with st.lock:
                    st.stats["slowdowns"] += 1
                gcs = path.startswith(("/storage/", "/download/"))
                body = GCS_503 if gcs else S3_SLOWDOWN
                ctype = "application/json" if gcs else "application/xml"
                conn.sendall(f"HTTP/1.1 503 Slow Down\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                             f"\r\n".encode() + body)
                continue
            status, head, body = _forward(up_host, int(up_port), raw)
            cut = method == "GET" and len(body) > st.reset_after and st.roll(st.reset)
            conn.sendall(head)
            if cut:
                conn.sendall(body[:st.reset_after])
                with st.lock:
                    st.stats["resets"] += 1
                time.sleep(0.2)  # as on a network: the bytes sent arrive and are read before the reset
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return  # closed with a reset, mid-body
            conn.sendall(body)
    except (ConnectionError, OSError):
        return
    finally:
        try:
            conn.close()
        except OSError:
            pass


def _forward(host: str, port: int, raw: bytes) -> tuple[int, bytes, bytes]:
    """Send the request as it came; the response re-framed with a Content-Length."""
    s = socket.create_connection((host, port))
    try:
        s.sendall(raw)
        resp = http.client.HTTPResponse(s, method=raw.split(b" ", 1)[0].decode())
        resp.begin()
        body = resp.read()
        lines = [f"HTTP/1.1 {resp.status} {resp.reason}"]
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                lines.append(f"{k}: {v}")
        lines.append(f"Content-Length: {len(body)}")
        return resp.status, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), body
    finally:
        s.close()


class DataPort:
    """The listening socket clients use; closed (connection refused) while the store is 'gone'."""

    def __init__(self, st: State):
        self.st, self.sock, self.port = st, None, 0
        self.conns: set[socket.socket] = set()
        self.open()

    def open(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        self.port, self.sock = s.getsockname()[1], s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, s: socket.socket) -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return  # closed: the store is gone
            with self.st.lock:
                self.conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            _serve(conn, self.st)
        finally:
            with self.st.lock:
                self.conns.discard(conn)

    def down(self, seconds: float) -> None:
        """Gone: the port closed, and the connections clients keep alive reset."""
        self.st.stats["down_since"] = time.time()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept(): a bare close() leaves the port listening
        except OSError:
            pass
        self.sock.close()
        with self.st.lock:
            live, self.conns = list(self.conns), set()
        for c in live:
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if seconds >= 0:
            def back():
                time.sleep(seconds)
                self.open()
                self.st.stats["down_since"] = None
            threading.Thread(target=back, daemon=True).start()


def control_handler(st: State, data: DataPort):
    class Control(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _reply(self, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            with st.lock:
                self._reply(dict(st.stats))

        def do_POST(self):
            args = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path == "/faults":
                st.slowdown = float(args.get("slowdown", st.slowdown))
                st.reset = float(args.get("reset", st.reset))
                st.reset_after = int(args.get("reset_after", st.reset_after))
            elif self.path == "/down":
                data.down(float(args["seconds"]))
            self._reply({"ok": True})
    return Control


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.faultproxy")
    p.add_argument("--upstream", required=True, help="HOST:PORT of the real server")
    p.add_argument("--ports-file", required=True)
    a = p.parse_args(argv)
    st = State(a.upstream)
    data = DataPort(st)
    control = ThreadingHTTPServer(("127.0.0.1", 0), control_handler(st, data))
    with open(a.ports_file + ".tmp", "w") as f:
        json.dump({"port": data.port, "control": control.server_address[1]}, f)
    import os

    os.replace(a.ports_file + ".tmp", a.ports_file)
    control.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
