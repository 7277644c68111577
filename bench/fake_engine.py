"""An instant OpenAI-compatible chat server that can misbehave on purpose.

    python bench/fake_engine.py PORT [--fault ok|500|503|reset|hang|malformed|truncated] [--fail-first N] [--die-after N]
        [--delay S] [--context N] [--routes vllm|none|html]

Every ``POST /v1/chat/completions`` is answered (after ``--delay`` seconds; at once by default) with a
GenRM judgment: an analysis, then the preference for the response shown first if the word "right"
comes before "wrong" in the request (a fair judge for tests' pairs; "A" when neither is there), with
each token's log-probabilities when the request asks for ``logprobs`` (as vLLM sends them), unless a
fault is asked for: the first ``--fail-first`` requests (all of them when 0) get the fault, the rest
the answer. With ``--die-after N`` the process exits when chat request N + 1 arrives, without
answering it (a server that dies mid-run). ``GET /count`` says how many chat requests came, so a test
can see the client's retries; ``GET /health`` is 200; ``GET /v1/models`` lists no model, so a client
keeps to its character budget, unless ``--context N`` is given: then model ``fake`` has ``max_model_len``
N and ``POST /tokenize`` counts a prompt (roughly: a token a word), as vLLM lets a client fit its context.
``--routes none`` drops those two routes (404, as an OpenAI-compatible server that is not vLLM, or a proxy,
answers), ``--routes html`` answers them with a web page (a gateway's); every request's path and headers are
kept in ``seen``.
In a test's own process (``calls``, ``keys`` and ``requests`` then readable directly)
:meth:`FakeEngine.start` serves it on the running event loop.

The benches use it as the engine that costs nothing (the library's own ceiling); the fault tests as
a real server over loopback that fails the ways real ones do. It is plain asyncio, not a web
framework, because a framework will not send a truncated body or reset a connection mid-request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request

FAULTS = ("ok", "500", "503", "reset", "hang", "malformed", "truncated")
ROUTES = ("vllm", "none", "html")  # how /v1/models and /tokenize are served: as vLLM does, not at all, as a web page


def completion(model: str, text: str, top_logprobs: int | None = None) -> bytes:
    """The answer; with ``top_logprobs`` (a request with ``logprobs``) each token's log-probability and its
    alternatives, as vLLM sends them: the verdict token's alternatives are the other choice."""
    right, wrong = text.find("right"), text.find("wrong")
    first = "B" if wrong >= 0 and (right < 0 or wrong < right) else "A"
    answer = json.dumps(
        {"analysis": f"Response {first} answers the question; the other does not.", "preference": first}
    )
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}
    if top_logprobs is not None:
        choice["logprobs"] = {
            "content": [token_logprobs(token, first, top_logprobs) for token in _TOKEN.findall(answer)]
        }
    return json.dumps(
        {
            "id": "fake",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [choice],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
        }
    ).encode()


_TOKEN = re.compile(r"\w+|\s+|[^\w\s]")


def token_logprobs(token: str, verdict: str, top: int) -> dict:
    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    others = [("B" if verdict == "A" else "A", -1.6)] if token == verdict else []
    others += [(f"{token}{i}", -4.0 - i) for i in range(max(top - 1 - len(others), 0))]
    return {
        **entry(token, -0.22),
        "top_logprobs": [entry(token, -0.22)] + [entry(t, lp) for t, lp in others][: max(top - 1, 0)],
    }


def response(
    status: str,
    body: bytes,
    content_type: str = "application/json",
    length: int | None = None,
    keep_alive: bool = False,
) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body) if length is None else length}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode() + body


class FakeEngine:
    def __init__(
        self,
        fault: str = "ok",
        fail_first: int = 0,
        die_after: int | None = None,
        delay_s: float = 0.0,
        context: int | None = None,
        routes: str = "vllm",
    ):
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {', '.join(FAULTS)}, not {fault!r}")
        if routes not in ROUTES:
            raise ValueError(f"routes must be one of {', '.join(ROUTES)}, not {routes!r}")
        self.fault, self.fail_first, self.die_after, self.delay_s = fault, fail_first, die_after, delay_s
        self.context, self.routes = context, routes
        self.seen: list[tuple[str, str, dict]] = []  # every request's method, path and headers (lower-case names)
        self.counted = 0  # prompts counted (POST /tokenize)
        self.chat_requests = 0
        self.calls: list[str] = []  # each chat request's last message
        self.keys: list[str] = []  # each chat request's Authorization header
        self.requests: list[dict] = []  # each chat request's body

    async def start(self, port: int = 0) -> int:
        """Serve on the running loop; the port (a free one for 0)."""
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", port, reuse_address=True, backlog=1024)
        return self.server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: requests answered in turn while the client keeps it open (as real servers do)."""
        try:
            while await self._one(reader, writer):
                pass
        finally:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; whether the connection stays open for another."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines if ":" in h)}
            body = await reader.readexactly(int(headers.get("content-length", 0)))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ConnectionError):
            return False
        self.seen.append((method, path, headers))
        vllm_route = (method == "GET" and path.endswith("/models")) or (method == "POST" and path == "/tokenize")
        if vllm_route and self.routes == "html":
            page = b"<!doctype html><html><body><h1>Gateway</h1></body></html>"
            writer.write(response("200 OK", page, content_type="text/html", keep_alive=True))
        elif vllm_route and self.routes == "none":
            writer.write(response("404 Not Found", b'{"detail": "Not Found"}', keep_alive=True))
        elif method == "GET" and path == "/count":
            writer.write(response("200 OK", json.dumps({"chat": self.chat_requests}).encode()))
        elif method == "GET" and path == "/health":
            writer.write(response("200 OK", b"{}"))
        elif method == "GET" and path.endswith("/models"):
            models = [{"id": "fake", "object": "model", "max_model_len": self.context}] if self.context else []
            writer.write(response("200 OK", json.dumps({"object": "list", "data": models}).encode()))
        elif method == "POST" and path == "/tokenize":  # a token a word and a piece of punctuation, roughly
            self.counted += 1
            messages = json.loads(body or b"{}").get("messages") or []
            count = sum(len(_TOKEN.findall(str(m.get("content", "")))) + 4 for m in messages)
            writer.write(response("200 OK", json.dumps({"count": count}).encode(), keep_alive=True))
            await writer.drain()
            return True
        elif method == "POST" and path.endswith("/chat/completions"):
            self.chat_requests += 1
            if self.die_after is not None and self.chat_requests > self.die_after:
                os._exit(0)
            failing = self.fault != "ok" and (self.fail_first == 0 or self.chat_requests <= self.fail_first)
            request = json.loads(body or b"{}")
            model, text = request.get("model", "fake"), str((request.get("messages") or [{}])[-1].get("content", ""))
            self.calls.append(text)
            self.keys.append(headers.get("authorization", ""))
            self.requests.append(request)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if not failing:
                top = request.get("top_logprobs") or 0 if request.get("logprobs") else None
                writer.write(response("200 OK", completion(model, text, top), keep_alive=True))
            elif self.fault in ("500", "503"):
                reason = "Internal Server Error" if self.fault == "500" else "Service Unavailable"
                writer.write(
                    response(
                        f"{self.fault} {reason}", json.dumps({"error": {"message": f"fake {self.fault}"}}).encode()
                    )
                )
            elif self.fault == "reset":  # RST instead of FIN: the client sees "connection reset by peer"
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return False
            elif self.fault == "hang":
                await asyncio.sleep(3600)
            elif self.fault == "malformed":
                writer.write(response("200 OK", b'{"id": "fake", "choices": [{"message": {"content": '))
            elif self.fault == "truncated":  # promises the whole body, sends half, hangs up
                whole = completion(model, text)
                writer.write(response("200 OK", whole[: len(whole) // 2], length=len(whole)))
            if failing:
                await writer.drain()
                return False
        else:
            writer.write(response("404 Not Found", b'{"error": "not found"}'))
            await writer.drain()
            return False
        await writer.drain()
        return True


def spawn(*flags: str, port: int | None = None, timeout_s: float = 30) -> tuple[subprocess.Popen, str]:
    """This engine in its own process (on ``port``, else a free one), once it answers; and its base URL."""
    if port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, __file__, str(port), *flags])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).close()
            return process, url
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"the fake engine did not start (flags {flags})") from None
            time.sleep(0.1)


async def serve(port: int, engine: FakeEngine) -> None:
    await engine.start(port)
    async with engine.server:
        await engine.server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--fault", choices=FAULTS, default="ok")
    parser.add_argument(
        "--fail-first", type=int, default=0, help="only the first N chat requests get the fault (0: all)"
    )
    parser.add_argument("--die-after", type=int, default=None, help="exit when chat request N + 1 arrives, unanswered")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--context", type=int, default=None, help="report this context length and count tokens")
    parser.add_argument(
        "--routes",
        choices=ROUTES,
        default="vllm",
        help="/v1/models and /tokenize: as vLLM serves them, absent (404), or a web page",
    )
    args = parser.parse_args()
    asyncio.run(
        serve(args.port, FakeEngine(args.fault, args.fail_first, args.die_after, args.delay, args.context, args.routes))
    )


if __name__ == "__main__":
    main()
