"""A slow HTTP/1.1 app for drain, timeout and overload tests (loopback only).

GET /slow/MS/... answers 200 after MS milliseconds; anything else answers 200 at once.
Each answer is JSON {"path", "slept_ms"}. Usage: slow_app.py PORT_FILE
"""
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port_file = sys.argv[1]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        parts = self.path.split("/")
        slept = 0
        if len(parts) > 2 and parts[1] == "slow" and parts[2].isdigit():
            slept = min(int(parts[2]), 120_000)
            time.sleep(slept / 1000)
        body = json.dumps({"path": self.path, "slept_ms": slept}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512


server = Server(("127.0.0.1", 0), Handler)
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
import os
os.rename(port_file + ".tmp", port_file)
server.serve_forever()
