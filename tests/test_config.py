import json
import os
import subprocess
import sys

import pytest

from reflectagent.backends import resolve_backend
from reflectagent.config import ConfigError, OverrideError, load_settings

TOML = """
default_backend = "api"
[backends.api]
model = "openai/gpt-4o-mini"
api_key_env = "TEST_JUDGE_KEY"
temperature = 0.3
[backends.local]
model = "hosted_vllm/judge"
api_base = "http://127.0.0.1:9/v1"
"""

YAML = """
backends:
  other:
    model: anthropic/claude-3-5-haiku-latest
    max_tokens: 200
    constrained: true
"""


def test_toml_backends_resolve_to_lms_without_leaking_the_key(tmp_path, monkeypatch):
    path = tmp_path / "reflectagent.toml"
    path.write_text(TOML)
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret-123")
    settings = load_settings(path)
    assert set(settings.backends) == {
        "embedded",
        "api",
        "local",
        "qwen2.5-coder-1.5b",
        "qwen2.5-coder-0.5b",
        "qwen2.5-coder-1.5b-verdict",
    }
    lm = resolve_backend(settings=settings)
    assert lm.backend.name == "api" and lm.model == "openai/gpt-4o-mini" and lm.kwargs["temperature"] == 0.3
    assert "sk-secret-123" not in repr(lm.backend.identity)
    assert lm.backend.constrained is False and lm.backend.logprobs is False
    local = resolve_backend("local", settings)
    assert local.backend.constrained and local.backend.logprobs and local.backend.api_base == "http://127.0.0.1:9/v1"


def test_env_picks_the_backend_and_yaml_works(tmp_path, monkeypatch):
    path = tmp_path / "judges.yaml"
    path.write_text(YAML)
    monkeypatch.setenv("REFLECTAGENT_CONFIG", str(path))
    monkeypatch.setenv("REFLECTAGENT_BACKEND", "other")
    lm = resolve_backend()
    assert lm.backend.name == "other" and lm.kwargs["max_tokens"] == 200 and lm.backend.constrained


def test_config_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("TEST_JUDGE_KEY", raising=False)
    path = tmp_path / "c.toml"
    path.write_text(TOML)
    with pytest.raises(ConfigError, match="unknown backend 'nope'; known: api, embedded, local"):
        resolve_backend("nope", load_settings(path))
    with pytest.raises(ConfigError, match=r"\$TEST_JUDGE_KEY is not set"):
        resolve_backend("api", load_settings(path))
    path.write_text('[backends.x]\nmodel = "openai/gpt-4o"\nlora = {a = "/tmp"}\n')
    with pytest.raises(ConfigError, match="only apply to the embedded backend"):
        load_settings(path)
    path.write_text('[backends.x]\nmodle = "typo"\n')
    with pytest.raises(ConfigError, match="invalid config"):
        load_settings(path)
    path.write_text("[backends\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path)


def test_model_folders_that_differ_only_deep_in_the_weights_are_different_backends(tmp_path):
    """Two models fine-tuned from one base share their size and first megabyte (header, embeddings):
    the cache must still tell them apart, or one model's judgments are served for the other."""
    from reflectagent.backends import fingerprint

    head = bytes(range(256)) * 8192  # 2 MB in common
    for name, tail in (("response", b"\x01" * 4096), ("unified", b"\x02" * 4096)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"model_type": "llama"}')
        (tmp_path / name / "model.safetensors").write_bytes(head + tail)
    assert fingerprint(tmp_path / "response") != fingerprint(tmp_path / "unified")
    (tmp_path / "copy").mkdir()
    for path in (tmp_path / "response").iterdir():
        (tmp_path / "copy" / path.name).write_bytes(path.read_bytes())
    assert fingerprint(tmp_path / "copy") == fingerprint(tmp_path / "response")  # the place does not matter


def test_a_prepared_preset_is_keyed_on_its_pins_and_any_other_folder_on_its_bytes(tmp_path):
    """The same preset prepared by another version of our code or of transformers (another source record,
    another ``transformers_version`` in config.json) is the same model: its judgments must be found again.
    A different pin is another model; a folder with no pin (a fine-tuned model) is keyed on its bytes."""
    from reflectagent.backends import fingerprint
    from reflectagent.config import BackendConfig, Settings
    from reflectagent.models import landing

    def identity(name: str) -> str:
        config = BackendConfig(model="embedded", model_path=str(tmp_path / name))
        return resolve_backend("x", Settings(backends={"x": config})).backend.identity["base"]

    def prepared(name: str, source: dict | None, transformers_version: str = "5.19.0") -> str:
        with landing(tmp_path / name, "x.gguf", source) as partial:
            partial.mkdir()
            (partial / "config.json").write_text(
                json.dumps({"model_type": "qwen2", "transformers_version": transformers_version})
            )
            (partial / "model.safetensors").write_bytes(b"weights")
        return identity(name)

    pin = {"name": "qwen2.5-coder-1.5b", "sha256": "cc324af070c2ecbf" + "0" * 48}
    first = prepared("first", pin)
    assert first == prepared("later", {**pin, "dtype": "float32", "note": "a field added since"}, "5.18.0")
    assert first != prepared("other", {**pin, "sha256": "1d9614638d18024d" + "0" * 48})
    tuned = {"base_sha256": pin["sha256"], "adapter_fingerprint": "aaaa"}
    assert prepared("tuned", tuned) == prepared(
        "merged-by-a-bench", {**tuned, "name": "another", "dtype": "float32"}, "5.18.0"
    )
    assert prepared("tuned", tuned) not in (first, prepared("retrained", {**tuned, "adapter_fingerprint": "bbbb"}))
    assert prepared("unpinned", None) == fingerprint(tmp_path / "unpinned")
    assert prepared("unpinned-old", None, "5.18.0") != prepared("unpinned", None)  # no pin: the bytes decide

    weights = tmp_path / "first" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # saved into it later
    assert identity("first") == fingerprint(tmp_path / "first") != first
    (tmp_path / "later" / ".reflectagent-complete").unlink()  # not a finished preparation: its record is not trusted
    assert identity("later") == fingerprint(tmp_path / "later")


def test_every_option_reaches_a_hosted_vllm_backend(tmp_path):
    """Options are read from the config, never copied: a constrained hosted_vllm backend keeps its own
    max_text_chars (it was once always held to 480), budget, seed and switches."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[backends.judge]\nmodel = "hosted_vllm/judge"\napi_base = "http://127.0.0.1:9/v1"\n'
        "max_tokens = 2048\nmax_text_chars = 1500\ncontext_chars = 9000\nseed = 7\nlogprobs = false\n"
    )
    lm = resolve_backend("judge", load_settings(path))
    assert lm.backend.max_text_chars == 1500 and lm.backend.adapter().max_text_chars == 1500
    assert (lm.backend.context_chars, lm.backend.seed, lm.backend.constrained, lm.backend.logprobs) == (
        9000,
        7,
        True,
        False,
    )
    assert lm.kwargs["max_tokens"] == 2048


def test_importing_the_library_leaves_the_environment_alone():
    code = (
        "import os; before = dict(os.environ); import reflectagent as ra, reflectagent.backends, "
        "reflectagent.embedded, reflectagent.steps, reflectagent.programs, reflectagent.eval; ra.Pair; "
        "print(dict(os.environ) == before)"
    )
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_LOCAL_MODEL_COST_MAP"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "True"


def test_a_server_that_failed_to_start_is_not_started_again_by_every_waiting_step():
    from reflectagent.backends import Backend, BackendLM
    from reflectagent.config import BackendConfig
    from reflectagent.server import ServerError

    calls = []

    def start():
        calls.append(1)
        raise ServerError("vLLM exited with code 1 before it was ready")

    lm = BackendLM(
        Backend(
            name="e",
            config=BackendConfig(model="embedded"),
            model="hosted_vllm/embedded",
            api_base=None,
            identity={},
            start=start,
        )
    )
    for _ in range(3):
        with pytest.raises(ServerError, match="exited"):
            lm.connect()
    assert calls == [1] and lm.api_base is None


def test_a_running_server_is_reused_only_for_the_same_folder_and_context(tmp_path, monkeypatch):
    from reflectagent import embedded

    served = {
        "embedded": {"id": "embedded", "root": str(tmp_path / "smollm"), "max_model_len": 2048},
        "judge": {"id": "judge", "root": "/adapters/judge", "parent": "embedded"},
    }
    monkeypatch.setattr(embedded, "served_models", lambda url: served)
    assert embedded.answers_for("http://x/v1", tmp_path / "smollm", {"judge": "/adapters/judge"}, 2048)
    assert not embedded.answers_for("http://x/v1", tmp_path / "qwen", {}, 2048)  # another model under the same name
    assert not embedded.answers_for("http://x/v1", tmp_path / "smollm", {}, 4096)  # another context
    assert not embedded.answers_for("http://x/v1", tmp_path / "smollm", {"other": "/a"}, 2048)  # a missing adapter
    monkeypatch.setenv("REFLECTAGENT_EMBEDDED_URL", "http://x/v1")
    with pytest.raises(ConfigError, match="does not serve .*qwen.* with a 2048-token context"):
        embedded.embedded_url(tmp_path / "qwen", {}, 2048)


def test_a_server_announced_by_serve_is_reused_only_in_the_same_dtype(tmp_path, monkeypatch):
    from reflectagent import embedded

    monkeypatch.setenv("REFLECTAGENT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REFLECTAGENT_EMBEDDED_URL", raising=False)
    served = {"embedded": {"id": "embedded", "root": str(tmp_path / "qwen"), "max_model_len": 4096}}
    monkeypatch.setattr(embedded, "served_models", lambda url: served)
    started = []
    monkeypatch.setattr(embedded.VLLMServer, "start", lambda self: started.append(self.spec.dtype) or "http://new/v1")
    monkeypatch.setattr(embedded.VLLMServer, "url", property(lambda self: "http://new/v1"))
    embedded.publish("http://announced/v1", {}, "float32")
    assert embedded.embedded_url(tmp_path / "qwen", {}, 4096, "float32") == "http://announced/v1"
    assert embedded.embedded_url(tmp_path / "qwen", {}, 4096, "bfloat16") == "http://new/v1"
    assert started == ["bfloat16"]
    embedded._servers.clear()


def test_each_local_preset_is_a_backend_by_its_name():
    from reflectagent.config import Settings
    from reflectagent.presets import PRESETS

    settings = Settings()
    for name in PRESETS:
        assert settings.backend(name)[1].model_path == name


def test_a_command_line_dtype_overrides_one_embedded_backend_and_keys_its_cache(tmp_path):
    """``judge --dtype``: the override is validated like the config file, keys the cache (a bf16 verdict
    is not a float32 one), becomes the backend judged with, and leaves the loaded settings alone."""
    path = tmp_path / "c.toml"
    path.write_text(TOML)
    settings = load_settings(path)
    fast = settings.overriding("embedded", dtype="float32")
    assert fast.default_backend == "embedded" and fast.backends["embedded"].dtype == "float32"
    assert fast.backends["embedded"].context_chars == 4000  # the rest of the backend is kept
    assert settings.backends["embedded"].dtype is None and settings.default_backend == "api"
    plain, changed = resolve_backend("embedded", settings), resolve_backend(settings=fast)
    assert "dtype" not in plain.backend.identity and changed.backend.identity["dtype"] == "float32"
    # a change the backend cannot take is the flag's fault (OverrideError, a usage error in the CLI) ...
    with pytest.raises(OverrideError, match="backend 'api' cannot take .*only apply to the embedded backend"):
        settings.overriding(None, dtype="bfloat16")
    with pytest.raises(OverrideError, match="'bfloat16', 'float16' or 'float32'"):
        settings.overriding("embedded", dtype="float8")
    # ... an unknown backend is not: it is the same ConfigError it is without an override
    with pytest.raises(ConfigError, match="unknown backend 'nope'") as unknown:
        settings.overriding("nope", dtype="float32")
    assert not isinstance(unknown.value, OverrideError)


def test_a_value_under_a_secret_name_is_never_quoted_and_extra_cannot_repeat_a_field(tmp_path):
    from reflectagent.config import secret_named

    assert secret_named("api_key") and secret_named("backends", "x", "extra", "aws_secret_access_key")
    assert secret_named("access-token") and secret_named("db.password") and not secret_named("max_tokens", "timeout_s")
    path = tmp_path / "c.toml"
    path.write_text('[backends.a]\nmodel = "openai/x"\nauth_token = "sk-hidden-1"\nmax_tokens = "many"\n')
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert "sk-hidden-1" not in str(error.value) and "backends.a.auth_token: Extra inputs are not permitted" in str(
        error.value
    )
    assert (
        "backends.a.max_tokens: Input should be a valid integer, unable to parse string as an integer (got 'many')"
        in str(error.value)
    )
    for extra, shown in (
        ('{ model = "y" }', "extra.model: set by the backend's own model"),
        ("{ timeout = 9 }", "extra.timeout: set by the backend's own timeout_s"),
        ('{ my_secret = "sk-hidden-2" }', "extra.my_secret: a secret is never written in the config"),
    ):
        path.write_text(f'[backends.a]\nmodel = "openai/x"\nextra = {extra}\n')
        with pytest.raises(ConfigError, match=shown) as error:
            load_settings(path)
        assert (
            "sk-hidden-2" not in str(error.value) and len(str(error.value).splitlines()) == 2
        )  # the file, then one line


def test_extra_refuses_credentials_by_name_at_any_depth_and_takes_request_options_that_mention_tokens(tmp_path):
    """vLLM's and OpenAI's own options (``stop_token_ids``, ``prompt_cache_key``) are not secrets; an ``Authorization`` or
    ``X-Api-Key`` header written under ``extra_headers`` is one, refused without its value."""
    from reflectagent.config import credential_named

    path = tmp_path / "c.toml"
    path.write_text(
        '[backends.v]\nmodel = "hosted_vllm/judge"\napi_base = "http://127.0.0.1:8000/v1"\n'
        "extra = { stop_token_ids = [2], allowed_token_ids = [5, 6], return_tokens_as_token_ids = true, "
        'prompt_cache_key = "judge-v1", skip_special_tokens = false, extra_body = { response_format = { '
        'type = "json_schema", json_schema = { schema = { properties = { token = { type = "string" } }, '
        'required = ["token"] } } } } }\n'
    )
    extra = load_settings(path).backends["v"].extra
    assert extra["stop_token_ids"] == [2] and extra["prompt_cache_key"] == "judge-v1"
    for name in (
        "api_key",
        "openai_api_key",
        "X-Api-Key",
        "x-goog-api-key",
        "Authorization",
        "token",
        "access_token",
        "auth_token",
        "password",
        "client_secret",
        "secret",
        "aws_secret_access_key",
        "Cookie",
    ):
        assert credential_named(name), name
    for name in (
        "stop_token_ids",
        "allowed_token_ids",
        "return_tokens_as_token_ids",
        "prompt_cache_key",
        "max_tokens",
        "logit_bias",
        "cache_key",
        "keywords",
    ):
        assert not credential_named(name), name
    for extra, where in (
        ('{ extra_headers = { Authorization = "Bearer sk-hidden-3" } }', "extra.extra_headers.Authorization"),
        ('{ extra_headers = { "X-Api-Key" = "sk-hidden-3" } }', "extra.extra_headers.X-Api-Key"),
        ('{ extra_body = { api_key = "sk-hidden-3" } }', "extra.extra_body.api_key"),
        ('{ openai_api_key = "sk-hidden-3" }', "extra.openai_api_key"),
    ):
        path.write_text(f'[backends.a]\nmodel = "openai/x"\nextra = {extra}\n')
        with pytest.raises(
            ConfigError, match=f"{where}: a secret is never written in the config: .*api_key_env"
        ) as error:
            load_settings(path)
        assert "sk-hidden-3" not in str(error.value) and len(str(error.value).splitlines()) == 2
    from reflectagent.config import secret_named

    assert secret_named("backends", "a", "Authorization") and secret_named("Cookie")  # never shown in an error either
    path.write_text('[backends.a]\nmodel = "openai/x"\nAuthorization = "Bearer sk-hidden-4"\n')
    with pytest.raises(ConfigError, match="backends.a.Authorization: Extra inputs are not permitted") as error:
        load_settings(path)
    assert "sk-hidden-4" not in str(error.value)
