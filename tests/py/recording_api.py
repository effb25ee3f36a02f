"""A recording stand-in for the Kubernetes API server (pods list, pod eviction).

Answers like the API server for what the gateway's evictor asks (PodList for
GET /api/v1/namespaces/NS/pods with two pods, SA-0 and SA-1; a Status 201 for
POST .../pods/NAME/eviction, except that a pod named *-1 is protected by a
PodDisruptionBudget on its first eviction: 429, as the API server answers) and appends
each request (method, path, query, authorization, body) as a JSON line to the record
file. Usage: recording_api.py PORT_FILE RECORD_FILE
"""
import json
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port_file, record_file = sys.argv[1], sys.argv[2]
tries = {}
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def _record(self, body):
        url = urllib.parse.urlsplit(self.path)
        with open(record_file, "a") as f:
            f.write(json.dumps({
                "method": self.command, "path": url.path, "query": url.query,
                "authorization": self.headers.get("authorization", ""),
                "body": json.loads(body) if body else None,
            }) + "\n")
        return url

    def _send(self, code, doc):
        data = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = self._record(None)
        parts = url.path.strip("/").split("/")
        if len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
            ns = parts[3]
            sa = urllib.parse.parse_qs(url.query).get("fieldSelector", [""])[0].split("=")[-1]
            items = [{"metadata": {"name": f"{sa}-{i}", "namespace": ns},
                      "spec": {"serviceAccountName": sa, "containers": [{"name": "m"}]}} for i in range(2)]
            self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items})
        else:
            self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound"})

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length).decode()
        url = self._record(body)
        with lock:
            tries[url.path] = tries.get(url.path, 0) + 1
            first = tries[url.path] == 1
        if first and url.path.endswith("-1/eviction"):
            self._send(429, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 429,
                             "reason": "TooManyRequests",
                             "message": "Cannot evict pod as it would violate the pod's disruption budget."})
            return
        self._send(201, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201})

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
import os
os.rename(port_file + ".tmp", port_file)
server.serve_forever()
