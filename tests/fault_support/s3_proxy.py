"""A fault-injecting HTTP proxy in front of a local S3-compatible server (moto_server).

Used by tests/remote_s3.rs. It forwards every request to --upstream and, as the JSON file
named by --control says, first injects faults. The file is reread whenever it changes; its
counters count down as faults are injected:

  latency_ms    added before every request is answered
  slowdown      the next N requests are answered 503 SlowDown
  refuse        the next N connections are closed without an answer (a restarting server)
  drop_body     the next N object GETs send their headers and half the body, then close
  hang_s, hang  the next N object GETs wait hang_s seconds, then close (a timeout)
  missing       keys containing one of these strings are answered 404 NoSuchKey
  require_key   requests not signed with this access key id are answered 403
  read_only     when true, every PUT is answered 403 AccessDenied (a read-only bucket)
  hold_whole    while true, whole-shard GETs (of a .tar key, no Range header) wait before
                being forwarded

GET /__faults answers the faults injected so far, by kind, as JSON.
GET /__requests answers what was asked of the server, as JSON: "ranged" (GETs of a byte
range), "whole" (keys of whole-shard GETs, in arrival order), "whole_done" (those answered),
"max_whole_at_once" (most whole-shard GETs in progress at once) and "put" (keys put).
Prints "LISTENING <port>" once it accepts connections. When its standard input closes (the
test process ended, even by SIGKILL), it kills --server-pid (moto_server) and exits, so no
server outlives its test.
"""

import argparse
import http.client
import http.server
import json
import os
import signal
import socket
import sys
import threading
import time

LOCK = threading.Lock()
RULES = {}
INJECTED = {}
CONTROL = {"path": None, "mtime": None}
REQUESTS = {"ranged": 0, "whole": [], "whole_done": 0, "max_whole_at_once": 0, "put": []}
WHOLE_NOW = [0]


def reload_rules():
    try:
        mtime = os.stat(CONTROL["path"]).st_mtime_ns
    except FileNotFoundError:
        return
    if mtime != CONTROL["mtime"]:
        with open(CONTROL["path"]) as f:
            RULES.clear()
            RULES.update(json.load(f))
        CONTROL["mtime"] = mtime


def take(rule):
    """Consumes one count of `rule`; True when a fault of that kind is due."""
    with LOCK:
        reload_rules()
        if RULES.get(rule, 0) > 0:
            RULES[rule] -= 1
            INJECTED[rule] = INJECTED.get(rule, 0) + 1
            return True
        return False


def rule(name, default=None):
    with LOCK:
        reload_rules()
        return RULES.get(name, default)


def s3_error(handler, status, code, message):
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    ).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/xml")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
    with LOCK:
        INJECTED[code] = INJECTED.get(code, 0) + 1


class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream = None

    def log_message(self, fmt, *args):
        pass

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.path in ("/__faults", "/__requests"):
            with LOCK:
                data = json.dumps(INJECTED if self.path == "/__faults" else REQUESTS).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True
            return
        latency = rule("latency_ms", 0)
        if latency:
            time.sleep(latency / 1000)
        if take("refuse"):
            self.close_abruptly()
            return
        key = rule("require_key")
        if key and f"Credential={key}/" not in (self.headers.get("Authorization") or ""):
            s3_error(self, 403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist")
            return
        if take("slowdown"):
            s3_error(self, 503, "SlowDown", "Please reduce your request rate.")
            return
        object_get = self.command == "GET" and "?" not in self.path
        if self.command in ("GET", "HEAD") and any(m in self.path for m in rule("missing", [])):
            s3_error(self, 404, "NoSuchKey", "The specified key does not exist.")
            return
        if object_get and take("hang"):
            time.sleep(rule("hang_s", 5))
            self.close_abruptly()
            return
        if self.command == "PUT" and rule("read_only"):
            s3_error(self, 403, "AccessDenied", "Access Denied")
            return
        key = self.path.split("?")[0]
        whole = object_get and not self.headers.get("Range") and key.endswith(".tar")
        with LOCK:
            if whole:
                REQUESTS["whole"].append(key)
                WHOLE_NOW[0] += 1
                REQUESTS["max_whole_at_once"] = max(REQUESTS["max_whole_at_once"], WHOLE_NOW[0])
            elif object_get:
                REQUESTS["ranged"] += 1
            elif self.command == "PUT":
                REQUESTS["put"].append(key)
        try:
            while whole and rule("hold_whole"):
                time.sleep(0.01)
            self.forward(body, object_get)
        finally:
            if whole:
                with LOCK:
                    WHOLE_NOW[0] -= 1
                    REQUESTS["whole_done"] += 1

    def forward(self, body, object_get):
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "transfer-encoding", "content-length", "date", "server"):
                self.send_header(k, v)
        # A HEAD answer has no body but the object's length.
        length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else len(data)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        if object_get and resp.status in (200, 206) and len(data) > 1024 and take("drop_body"):
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_abruptly()
            return
        self.wfile.write(data)

    def close_abruptly(self):
        # A reset, not a clean end: the client must see the connection fail.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.close_connection = True
        self.connection.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = handle_any


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--server-pid", type=int)
    args = ap.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    Proxy.upstream = (host, int(port))
    CONTROL["path"] = args.control
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    server.daemon_threads = True
    print(f"LISTENING {server.server_address[1]}", flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.buffer.read()  # returns at EOF: the test process is gone
    if args.server_pid:
        try:
            os.kill(args.server_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    sys.exit(main())
