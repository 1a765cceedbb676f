"""A real HTTP server on 127.0.0.1 that speaks the chat-completions API with scripted replies.

Each request takes the next step of the script; every request body is recorded, so tests can
read exactly what a prompt contained.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(text: str, model: str = "scripted") -> dict:
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
    }


class ScriptedServer:
    """Steps: ("reply", text), ("status", code), ("sleep", seconds[, text]), ("garbage", text), or
    a function of the request body that returns one.
    When the script runs out, `default` (a step) answers. A sleep ends early on `wake.set()`
    or when the server stops, so a test never waits for it. `port` 0 picks a free port; give
    one to bring a server up where nothing listened before.

    `GET /v1/models` answers `{"data": models}` when `models` (a list of model entries) is
    given, else 404 (as many servers do); `listings` counts those requests."""

    def __init__(self, script=(), default=("status", 503), port: int = 0, models: list[dict] | None = None):
        self.script = list(script)
        self.default = default
        self.models = models
        self.listings = 0
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with server.lock:
                    server.listings += 1
                if self.path.rstrip("/").endswith("/models") and server.models is not None:
                    self._send(200, json.dumps({"object": "list", "data": server.models}).encode())
                else:
                    self._send(404, json.dumps({"error": {"message": "not found"}}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    step = server.script.pop(0) if server.script else server.default
                if callable(step):  # a step chosen by the request, e.g. by its model
                    step = step(body)
                kind = step[0]
                if kind == "sleep":
                    server.wake.wait(step[1])
                    step = ("reply", step[2]) if len(step) > 2 else ("reply", "late")
                    kind = "reply"
                if kind == "reply":
                    self._send(200, json.dumps(completion(step[1], body.get("model", "m"))).encode())
                elif kind == "status":
                    self._send(step[1], json.dumps({"error": {"message": f"scripted {step[1]}"}}).encode())
                elif kind == "garbage":
                    self._send(200, step[1].encode(), content_type="text/plain")

            def _send(self, code, payload, content_type="application/json"):
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def prompts(self) -> list[str]:
        return [m["content"] for r in self.requests for m in r["messages"]]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.wake.set()
        self.httpd.shutdown()
        self.httpd.server_close()
