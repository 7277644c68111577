"""The step path's own client for vLLM backends (``reflectagent.vllm_client``), against the fake engine on
loopback (control flow, faults) and once against the real embedded server: it sends the very request DSPy
sends, reads the same verdict, probability and usage from the reply, and fails, retries and times out as
DSPy's path does."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
import warnings

import dspy
import pytest
from dspy.utils.exceptions import LMProviderError, LMServerError, LMTimeoutError, LMTransportError
from fakes import Engine, LoopThread, ThreadEngine, fake_engine

from reflectagent.backends import BackendLM, resolve_backend
from reflectagent.cache import JudgmentCache, use_cache
from reflectagent.config import BackendConfig, Settings
from reflectagent.judge import RunInterrupted, judge_pairs
from reflectagent.pairs import Pair
from reflectagent.programs import GenRM, MTBenchJudge
from reflectagent.signatures import Analyze
from reflectagent.steps import arun_step

PAIRS = [Pair(prompt=f"question {i}", response_a=f"right {i}", response_b=f"wrong {i}") for i in range(3)]


class ThroughDSPy(BackendLM):
    """The same backend with no client of its own: its steps go through DSPy's transport."""

    client = None


def vllm(api_base: str, **options) -> BackendLM:
    config = {"num_retries": 0, "seed": 7, **options}
    return resolve_backend(
        "fake", Settings(backends={"fake": BackendConfig(model="hosted_vllm/fake", api_base=api_base, **config)})
    )


def judged(lm, pairs=PAIRS, program=None, concurrency=4, **options):
    with dspy.context(lm=lm, **options), use_cache(JudgmentCache(enabled=False)):
        return judge_pairs(
            program or GenRM(both_orders=True, decision="probability"), pairs, concurrency=concurrency, progress=False
        )


def test_the_direct_path_sends_what_dspy_sends_and_reads_the_same_answer():
    with ThreadEngine() as engine:
        lm = vllm(engine.api_base)
        assert lm.backend.direct and lm.client is not None and lm.backend.constrained and lm.backend.logprobs
        direct = judged(lm)
        sent = list(engine.requests)
        engine.requests.clear()
        through = judged(ThroughDSPy(lm.backend))
        expected = list(engine.requests)
    key = lambda body: body["messages"][-1]["content"]  # noqa: E731 (concurrent: match requests by their text)
    assert sorted(sent, key=key) == sorted(expected, key=key)  # the very same bodies, schema and log-probs included
    assert sent[0]["response_format"]["json_schema"]["name"] == "Analyze" and sent[0]["top_logprobs"] == 5
    for mine, theirs in zip(direct, through, strict=True):
        assert mine.preference == theirs.preference == "A"
        assert mine.probability_a == pytest.approx(theirs.probability_a) and 0.5 < mine.probability_a < 1
        for a, b in zip(mine.analyses, theirs.analyses, strict=True):
            assert (a.text, a.raw, a.probability, a.parsed) == (b.text, b.raw, b.probability, b.parsed)
            assert (a.usage.lm_calls, a.usage.prompt_tokens, a.usage.completion_tokens) == (1, 100, 20)


def test_history_trace_and_a_baselines_adapter_as_dspy_keeps_them():
    with ThreadEngine() as engine:
        lm = vllm(engine.api_base, logprobs=False)
        trace: list = []
        with dspy.context(lm=lm, trace=trace), use_cache(JudgmentCache(enabled=False)):
            judgment = GenRM().judge(PAIRS[0])
            peer = MTBenchJudge().judge(PAIRS[0])  # MT-Bench's own prompt and parser (a plain dspy.Adapter)
        assert judgment.preference == "A" and len(trace) == 1 and trace[0][2].preference == "A"
        entry = lm.history[0]
        assert entry["messages"][-1]["content"] == engine.requests[0]["messages"][-1]["content"]
        assert entry["outputs"] == [judgment.analyses[0].raw] and entry["usage"]["prompt_tokens"] == 100
        assert "response_format" not in engine.requests[-1] and len(lm.history) == 3
        assert peer.reason == "unparsed" and all(a.raw for a in peer.analyses)  # the fake answers JSON, not [[A]]


def test_what_the_direct_path_cannot_keep_goes_through_dspy():
    from dspy.utils.callback import BaseCallback

    class Listener(BaseCallback):
        calls = 0

        def on_lm_start(self, call_id, instance, inputs):
            Listener.calls += 1

    with ThreadEngine() as engine:
        lm = vllm(engine.api_base)
        judged(lm, PAIRS[:1], GenRM(), callbacks=[Listener()])
    assert Listener.calls == 1  # DSPy's callbacks saw the call: it went through DSPy


@pytest.mark.parametrize("fault", ["500", "503", "reset", "truncated"])
def test_a_passing_fault_is_retried_with_dspys_backoff(fault):
    engine = Engine("--fault", fault, "--fail-first", "2")
    try:
        lm = vllm(f"{engine.url}/v1", num_retries=2)
        assert [j.preference for j in judged(lm, PAIRS[:2], GenRM())] == ["A", "A"]
        assert engine.count() == 2 + 2  # the two failures were retried, nothing else was asked twice
    finally:
        engine.stop()


@pytest.mark.parametrize(
    "fault, error, shown, tries",
    [
        ("500", LMServerError, "fake 500", 2),
        ("reset", LMTransportError, "reset", 2),
        ("hang", LMTimeoutError, "no reply within timeout_s = 1 s", 2),
        ("malformed", LMProviderError, "is not JSON", 1),
    ],
)
def test_a_lasting_fault_raises_dspys_error_and_a_reply_is_never_sent_again(fault, error, shown, tries):
    engine = Engine("--fault", fault)
    try:
        lm = vllm(f"{engine.url}/v1", num_retries=1, timeout_s=1)
        with pytest.raises(RunInterrupted) as stopped:
            judged(lm, PAIRS[:1], GenRM())
        cause = stopped.value.__cause__
        assert isinstance(cause, error) and shown in str(cause) and "hosted_vllm/fake" in str(cause)
        if fault == "hang":  # told in the config's terms, as on DSPy's path
            assert "gave no answer within timeout_s = 1 s (2 tries: num_retries = 1)" in str(stopped.value)
        if fault == "malformed":
            assert cause.status == 200  # a broken reply: the run may resume (judge.is_transient)
        assert engine.count() == tries
    finally:
        engine.stop()


def test_a_netrc_entry_for_the_servers_host_leaves_the_requests_as_they_are(tmp_path, monkeypatch):
    """aiohttp's ``trust_env`` read ``~/.netrc``: an entry for the server's host clashed with the Authorization header and
    every request raised a raw ValueError (removed in 5ec0eb6). The key sent is the backend's, never the netrc's."""
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1\nlogin someone\npassword from-netrc\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    with ThreadEngine() as engine:
        lm = vllm(engine.api_base)
        assert lm.client is not None  # the direct path, aiohttp's
        judgments = judged(lm, PAIRS[:1])
        keys = list(engine.keys)
    assert judgments[0].preference is not None and keys and set(keys) == {"Bearer not-needed"}


def test_a_server_that_reports_its_context_counts_each_prompt_once_and_a_long_one_is_cut():
    with ThreadEngine(context=2048) as engine:
        lm = vllm(engine.api_base)
        assert lm.backend.input_budget().tokens == 2048 - 512 - 4
        short = judged(lm, PAIRS[:2], GenRM())
        assert engine.counted == 2 and all(not j.analyses[0].truncated for j in short)  # counted, no thread, kept
        long = Pair(prompt="why? " * 1500, response_a="right", response_b="wrong")
        cut = judged(lm, [long], GenRM())[0]
    assert cut.analyses[0].truncated == ("prompt",) and cut.preference == "A"  # counted again, and cut to fit
    assert "characters cut to fit the judge's context" in engine.requests[-1]["messages"][-1]["content"]


def test_a_loop_that_ends_closes_its_connections_and_says_nothing(caplog):
    with warnings.catch_warnings():  # what earlier tests left to the collector (DSPy's own pools) is not this test's
        warnings.simplefilter("ignore")
        gc.collect()
    with ThreadEngine() as engine:
        lm = vllm(engine.api_base)

        async def one(i):
            with dspy.context(lm=lm), use_cache(JudgmentCache(enabled=False)):
                return await arun_step(dspy.Predict(Analyze), PAIRS[i].inputs())

        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.ERROR, logger="asyncio"):
            warnings.simplefilter("always")
            for i in range(3):  # a loop (and a session) each, closed as asyncio.run ends
                assert asyncio.run(one(i)).parsed
            gc.collect()
        assert not [str(w.message) for w in caught if "nclosed" in str(w.message)]
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            loop = asyncio.new_event_loop()  # one closed without shutting its generators down: let go, not logged
            assert loop.run_until_complete(one(0)).parsed
            loop.close()
            assert asyncio.run(one(1)).parsed
            gc.collect()
    assert "nclosed" not in caplog.text


@pytest.mark.server
def test_on_the_real_server_the_direct_path_and_dspys_give_the_same_steps(server, sample_pairs):
    """Greedy decoding, one request at a time (a CPU server's numbers move with the batch): the same request gives
    the same analysis, verdict, probability and tokens. The raw text differs in one way: DSPy's transport
    re-serialises a JSON answer (``{"analysis": "..."}``), the direct path keeps what the model wrote."""
    lm = resolve_backend(
        "embedded", Settings(backends={"embedded": BackendConfig(model="embedded", context_chars=4000)})
    )
    assert lm.backend.direct
    pairs = sample_pairs[:2]
    direct = judged(lm, pairs, GenRM(decision="probability"), concurrency=1)
    through = judged(ThroughDSPy(lm.backend), pairs, GenRM(decision="probability"), concurrency=1)
    for mine, theirs in zip(direct, through, strict=True):
        for a, b in zip(mine.analyses, theirs.analyses, strict=True):
            assert a.parsed and (a.text, a.preference) == (b.text, b.preference)
            assert json.loads(a.raw) == json.loads(b.raw)
            assert a.probability == pytest.approx(b.probability, abs=1e-6)
            assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (
                b.usage.prompt_tokens,
                b.usage.completion_tokens,
            )


class Recorder(LoopThread):
    """A chat server on loopback (the fake engine's answers) that keeps each request's path, headers and connection,
    and closes a connection left idle for ``keep_alive_s`` as uvicorn does: at once, or with ``lazy`` only as the
    next request comes (the server's timer and a request crossing: that request is dropped unanswered)."""

    def __init__(self, keep_alive_s: float | None = None, lazy: bool = False, context: int | None = None):
        self.keep_alive_s, self.lazy, self.context = keep_alive_s, lazy, context
        self.requests: list[tuple[str, dict, int]] = []  # path, headers (lower-case names), connection
        self.connections = self.dropped = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def chat(self) -> list[tuple[dict, int]]:
        return [(headers, conn) for path, headers, conn in self.requests if path.endswith("/chat/completions")]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number, idle_since = self.connections, None
        try:
            while True:
                wait = self.keep_alive_s if idle_since is not None and not self.lazy else None
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), wait)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, *lines = head.decode("latin-1").split("\r\n")
                _, path, _ = request_line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines if ":" in h)}
                body = json.loads(await reader.readexactly(int(headers.get("content-length", 0))) or b"{}")
                if self.lazy and idle_since is not None and time.monotonic() - idle_since > self.keep_alive_s:
                    self.dropped += 1
                    return
                self.requests.append((path, headers, number))
                if path.endswith("/chat/completions"):
                    reply = fake_engine.completion(body.get("model", "fake"), str(body["messages"][-1]["content"]))
                elif path == "/tokenize":
                    reply = json.dumps({"count": 50}).encode()
                else:  # /v1/models
                    models = [{"id": "fake", "object": "model", "max_model_len": self.context}] if self.context else []
                    reply = json.dumps({"object": "list", "data": models}).encode()
                writer.write(fake_engine.response("200 OK", reply, keep_alive=True))
                await writer.drain()
                idle_since = time.monotonic()
        finally:
            writer.close()


def test_the_configs_headers_go_with_every_request_as_on_dspys_path():
    """``headers`` and ``extra_headers`` in a backend's ``extra`` were dropped on the direct path (they are the client's,
    not the body's): now on every chat and /tokenize request, merged as LiteLLM merges them for DSPy's path."""
    extra = {
        "headers": {"X-Tenant": "t1", "X-Route": "from-headers"},
        "extra_headers": {"X-Route": "judge", "User-Agent": "mine"},
    }
    with Recorder(context=2048) as server:
        lm = vllm(server.api_base, extra=extra)
        assert lm.client is not None and "extra_headers" not in lm.request_options()
        assert judged(lm, PAIRS[:1], GenRM())[0].preference == "A"
        sent = [(path, headers) for path, headers, _ in server.requests if path != "/v1/models"]
        server.requests.clear()
        assert judged(ThroughDSPy(lm.backend), PAIRS[:1], GenRM())[0].preference == "A"
        through = server.chat()[0][0]
    assert [path for path, _ in sent] == ["/tokenize", "/v1/chat/completions"]  # the prompt counted, then asked
    direct = [headers for _, headers in sent]
    for headers in direct:
        assert (headers["x-tenant"], headers["x-route"], headers["user-agent"]) == ("t1", "judge", "mine")
        assert headers["authorization"] == "Bearer not-needed" and headers["content-type"] == "application/json"
    assert {name: through[name] for name in ("x-tenant", "x-route", "user-agent")} == {
        name: direct[-1][name] for name in ("x-tenant", "x-route", "user-agent")
    }


def test_dspys_usage_tracker_sees_the_same_tokens_on_both_paths():
    """``with dspy.track_usage()`` around a judge saw nothing on the direct path (DSPy's LM records each reply's usage;
    the direct path bypasses it): now the same entries, as DSPy reads vLLM's ``usage``."""
    with ThreadEngine() as engine:
        lm = vllm(engine.api_base)
        tracked = []
        for path in (lm, ThroughDSPy(lm.backend)):
            with dspy.track_usage() as tracker:
                judged(path, PAIRS[:2])
            tracked.append((dict(tracker.usage_data), tracker.get_total_tokens()))
    (direct, direct_total), (through, through_total) = tracked
    assert direct == through and direct_total == through_total
    assert through_total["hosted_vllm/fake"]["prompt_tokens"] == 4 * 100  # two pairs, both orders
    assert through_total["hosted_vllm/fake"]["completion_tokens"] == 4 * 20


def ask(lm) -> dict:
    return lm.client.complete(lm.api_base, {"model": "fake", "messages": [{"role": "user", "content": "right, wrong"}]})


@pytest.mark.parametrize("closed", ["while the loop was not running", "as the request came"])
def test_a_kept_connection_the_server_closed_is_left_for_a_new_one(closed):
    """A request sent on a kept connection the server had closed failed (no retries here, so nothing hides it): a
    loop that did not run between requests never heard of the close, and a server's idle timer can cross a request.
    aiohttp sends no POST again by itself; the client now does, once, at once, on a new connection."""
    with Recorder(keep_alive_s=0.5, lazy=closed == "as the request came") as server:
        lm = vllm(server.api_base, num_retries=0)
        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(ask(lm))["choices"]
            time.sleep(1.0)  # the server lets the connection go (or will, as the next request comes)
            assert loop.run_until_complete(ask(lm))["choices"]
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        assert [conn for _, conn in server.chat()] == [1, 2]
        assert server.dropped == (closed == "as the request came")


def test_a_request_sent_again_goes_on_a_new_connection_not_another_kept_one():
    """The request sent again after a kept connection failed took whatever the pool handed out next: with two kept
    connections the server had let go, that was the other one, and the request failed. It now goes on a new one."""
    with Recorder(keep_alive_s=0.3, lazy=True) as server:
        lm = vllm(server.api_base, num_retries=0)
        loop = asyncio.new_event_loop()
        try:

            async def two():  # at once: two connections, both kept
                return await asyncio.gather(ask(lm), ask(lm))

            assert all(reply["choices"] for reply in loop.run_until_complete(two()))
            assert server.connections == 2
            time.sleep(0.6)  # the server lets both go (as each next request comes)
            assert loop.run_until_complete(ask(lm))["choices"]
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    assert server.dropped == 1 and server.connections == 3 and [conn for _, conn in server.chat()][-1] == 3


def test_kept_connections_are_let_go_before_vllms_server_would_close_them(monkeypatch):
    """aiohttp kept an idle connection 15 s, uvicorn (vLLM's server) 5 s: between the two, a request went to a
    connection the server was closing. The client lets go first; here both clocks shortened, none is dropped."""
    import inspect

    import uvicorn

    from reflectagent import vllm_client

    assert vllm_client.KEEPALIVE_S < inspect.signature(uvicorn.Config).parameters["timeout_keep_alive"].default
    monkeypatch.setattr(vllm_client, "KEEPALIVE_S", 0.3, raising=False)
    with Recorder(keep_alive_s=0.6, lazy=True) as server:
        lm = vllm(server.api_base, num_retries=0)

        async def two():
            await ask(lm)
            await asyncio.sleep(0.9)  # past the client's keep-alive, not the server's
            await ask(lm)

        asyncio.run(two())
    assert [conn for _, conn in server.chat()] == [1, 2] and server.dropped == 0


@pytest.fixture
def proxy_env(monkeypatch):
    from reflectagent.vllm_client import _env_proxy

    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    _env_proxy.cache_clear()
    yield monkeypatch
    _env_proxy.cache_clear()


def test_all_proxy_is_used_as_httpx_uses_it(proxy_env):
    """DSPy's transport (httpx) honours ``ALL_PROXY``; the direct path read only ``http(s)_proxy``: the same
    environment sent its requests past the proxy. A scheme's own proxy comes first, ``no_proxy`` beats both."""
    from reflectagent.config import ConfigError
    from reflectagent.vllm_client import _env_proxy

    def proxy(url):
        _env_proxy.cache_clear()
        return _env_proxy(url)

    proxy_env.setenv("ALL_PROXY", "proxy.example:3128")
    assert proxy("http://judge.example:8000/v1/chat/completions") == "http://proxy.example:3128"
    assert proxy("https://judge.example/v1/chat/completions") == "http://proxy.example:3128"
    proxy_env.setenv("http_proxy", "http://plain.example:8080")
    assert proxy("http://judge.example:8000/v1/chat/completions") == "http://plain.example:8080"
    assert proxy("https://judge.example/v1/chat/completions") == "http://proxy.example:3128"
    proxy_env.setenv("NO_PROXY", "judge.example")
    assert proxy("http://judge.example:8000/v1/chat/completions") is None
    assert proxy("https://other.example/v1/chat/completions") == "http://proxy.example:3128"
    proxy_env.setenv("NO_PROXY", "*")
    assert proxy("https://other.example/v1/chat/completions") is None
    proxy_env.delenv("NO_PROXY")
    proxy_env.delenv("http_proxy")
    proxy_env.setenv("ALL_PROXY", "socks5://someone:hidden@proxy.example:1080")
    with pytest.raises(ConfigError, match="all_proxy names a socks5 proxy for judge.example.*no_proxy") as refused:
        proxy("http://judge.example:8000/v1/chat/completions")
    assert "hidden" not in str(refused.value)


def test_a_request_goes_through_the_all_proxy(proxy_env):
    """End to end: the fake engine as the proxy (it answers a request for any host), the server's name one no
    resolver knows; the direct path reaches it only through ``ALL_PROXY``."""
    with ThreadEngine() as engine:
        proxy_env.setenv("ALL_PROXY", engine.url)
        lm = vllm("http://judge.invalid/v1")
        assert lm.client is not None
        assert judged(lm, PAIRS[:1], GenRM())[0].preference == "A"
        assert engine.calls and engine.keys == ["Bearer not-needed"]


def test_the_loopback_is_never_sent_to_a_proxy(proxy_env):
    """A proxy elsewhere cannot reach this machine's loopback, where the embedded server listens: a SOCKS
    ``ALL_PROXY`` in the shell must not stop (nor misroute) the offline default."""
    from reflectagent.vllm_client import _env_proxy

    proxy_env.setenv("ALL_PROXY", "socks5://proxy.example:1080")
    proxy_env.setenv("http_proxy", "http://plain.example:8080")
    for url in ("http://127.0.0.1:8000/v1/chat/completions", "http://localhost:8000/v1", "http://[::1]:8000/v1"):
        _env_proxy.cache_clear()
        assert _env_proxy(url) is None


@pytest.mark.parametrize("proxy", ["socks5://proxy.example:1080", "a dead HTTP proxy"])
def test_the_loopback_is_never_sent_to_a_proxy_by_the_httpx_requests_either(proxy_env, proxy):
    """``/v1/models`` and ``/tokenize`` (httpx) went to the environment's proxy for a server on 127.0.0.1: a SOCKS
    ``ALL_PROXY`` raised ImportError (httpx's socks transport needs socksio), an HTTP proxy that cannot reach this
    machine's loopback failed or hung them. They now go straight there, as the chat requests do."""
    from reflectagent.serving import loopback
    from reflectagent.serving.server import free_port, served_models
    from reflectagent.serving.tokens import pool_counter, server_context, server_counter

    if proxy.startswith("socks"):
        proxy_env.setenv("ALL_PROXY", proxy)
    else:
        proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    messages = [{"role": "user", "content": "right or wrong"}]
    with ThreadEngine(context=2048) as engine:
        server_context.cache_clear()
        try:
            assert served_models(engine.api_base)["fake"]["max_model_len"] == 2048
            assert server_context(engine.api_base, "fake") == 2048
            assert (
                server_counter(engine.api_base, "fake")(messages)
                == pool_counter([engine.api_base], "fake")(messages)
                > 0
            )
        finally:
            server_context.cache_clear()
    assert loopback.bypasses_proxy(engine.api_base) and loopback.httpx_options(engine.api_base) == {"trust_env": False}
    for host in ("localhost", "LOCALHOST.", "api.localhost", "127.1.2.3", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0"):
        assert loopback.bypasses_proxy(f"http://{host}:8000/v1"), host
    for host in ("judge.example", "10.0.0.1", "[2001:db8::1]", "localhost.example"):
        assert not loopback.bypasses_proxy(f"http://{host}:8000/v1") and not loopback.httpx_options(f"http://{host}/v1")


@pytest.mark.parametrize("routes", ["none", "html"])
@pytest.mark.parametrize("context_tokens", [None, 2048])
@pytest.mark.parametrize("path", ["direct", "through DSPy"])
def test_a_server_without_vllms_own_routes_is_judged_by_characters_with_one_warning(
    routes, context_tokens, path, caplog, monkeypatch
):
    """An OpenAI-compatible server that is not vLLM, or a proxy, has no ``GET /v1/models`` and no ``POST /tokenize``
    (404 here; or a web page in their place). Every judgment failed (the context was asked of ``/v1/models``, the
    prompt counted by ``/tokenize`` once ``context_tokens`` was set): now judging goes on with the configured context
    and the character budget, and one warning per backend says what the server lacks and what to set. Through DSPy
    the prompt is counted off the event loop (``tokens.server_counter``), directly by the backend's own client."""
    from reflectagent import backends

    monkeypatch.setattr(backends, "_warned", set(), raising=False)
    options = {"context_chars": 4000, **({"context_tokens": context_tokens} if context_tokens else {})}
    long = Pair(prompt="why? " * 1500, response_a="right", response_b="wrong")
    make = (lambda lm: lm) if path == "direct" else (lambda lm: ThroughDSPy(lm.backend))
    with ThreadEngine(routes=routes) as engine, caplog.at_level(logging.WARNING, logger="reflectagent"):
        first = judged(make(vllm(engine.api_base, **options)), PAIRS, GenRM())
        before = len(engine.seen)
        # resolved again (no new warning), one step at a time: the missing route is asked once, by the first step
        again = judged(make(vllm(engine.api_base, **options)), [*PAIRS, long], GenRM(), concurrency=1)
        chats = engine.chat_requests
        asked = [(method, p) for method, p, _ in engine.seen if not p.endswith("/chat/completions")]
        asked_again = [p for _, p, _ in engine.seen[before:] if not p.endswith("/chat/completions")]
    assert [j.preference for j in first + again] == ["A"] * 7 and chats == 7
    assert again[-1].analyses[0].truncated == ("prompt",)  # cut to context_chars
    told = [r.getMessage() for r in caplog.records if "as vLLM serves it" in r.getMessage()]
    route = "POST /tokenize" if context_tokens else "GET /v1/models"
    assert len(told) == 1, told
    assert f"backend 'fake': the server has no {route}" in told[0] and "context_chars = 4000 characters" in told[0]
    assert ("Set context_chars" if context_tokens else "Set context_tokens") in told[0]
    assert all(
        route == f"{method} {p.removeprefix('/v1')}".replace("GET /models", "GET /v1/models") for method, p in asked
    )
    assert len(asked_again) == 1


def test_the_configs_headers_and_key_go_to_models_and_tokenize_too(monkeypatch):
    """``/v1/models`` and ``/tokenize`` were asked without the config's headers (nor the key): a gateway that requires
    one refused them. Now they carry what the chat requests carry, merged the same way."""
    monkeypatch.setenv("FAKE_KEY", "k-123")
    extra = {"headers": {"X-Gateway": "g", "X-Route": "from-headers"}, "extra_headers": {"X-Route": "judge"}}
    with ThreadEngine(context=2048) as engine:
        lm = vllm(engine.api_base, extra=extra, api_key_env="FAKE_KEY")
        assert lm.backend.context_tokens == 2048
        assert lm.backend.input_budget().count([{"role": "user", "content": "right or wrong"}]) > 0
        asked = {(method, path): headers for method, path, headers in engine.seen}
    assert set(asked) == {("GET", "/v1/models"), ("POST", "/tokenize")}
    for headers in asked.values():
        assert (headers["x-gateway"], headers["x-route"], headers["authorization"]) == ("g", "judge", "Bearer k-123")
