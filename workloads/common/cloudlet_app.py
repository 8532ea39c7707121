"""The small HTTP front of the workloads' applications (docs/workloads.md): GET /health (with the
boot id the application started under),
GET /selftest (the application run on the sample input shipped with its recipe) and one POST
route that takes the request's body and answers JSON. Standard library only."""
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Read once, when the application starts: a VM synthesized from an overlay answers with the boot
# id of the VM the overlay was made from (it was resumed, never booted).
with open("/proc/sys/kernel/random/boot_id") as _f:
    BOOT_ID = _f.read().strip()


def serve(route, handle, sample, port=8000):
    """Serves POST `route` with handle(body: bytes) -> dict; ValueError means a bad request."""

    class Handler(BaseHTTPRequestHandler):
        def answer(self, status, body):
            text = isinstance(body, bytes)
            data = body if text else (json.dumps(body) + "\n").encode()
            self.send_response(status)
            self.send_header("content-type", "text/plain" if text else "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def run(self, body):
            try:
                self.answer(200, handle(body))
            except ValueError as e:
                self.answer(422, {"error": str(e)[-500:]})

        def do_GET(self):
            if self.path == "/health":
                return self.answer(200, f"ok boot={BOOT_ID}\n".encode())
            if self.path == "/selftest":
                with open(sample, "rb") as f:
                    return self.run(f.read())
            self.answer(404, {"error": "not found"})

        def do_POST(self):
            if self.path != route:
                return self.answer(404, {"error": "not found"})
            self.run(self.rfile.read(int(self.headers.get("content-length", "0"))))

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
