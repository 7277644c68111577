"""The judgment cache is where the settings say, whichever way judging is started: a ``backend()`` block's
settings, else those the LM in force was resolved from, else the config file's (read once), place the cache in
force, as ``open_cache`` places the commands'; and the fine-tuning loop's copies of its settings keep where that is."""

from __future__ import annotations

import pytest

from fakes import PAIR
from fakes import ThreadEngine as Engine
from reflectagent import cache as cache_module
from reflectagent.backends import backend, resolve_backend
from reflectagent.cache import DiskStore, JudgmentCache, RedisStore, caching, current_cache, use_cache
from reflectagent.cli.common import open_cache
from reflectagent.config import BackendConfig, ConfigError, Settings
from reflectagent.judge import judge_pairs
from reflectagent.programs import named_program

URL = "redis://127.0.0.1:1/0"  # never connected to: building a Redis cache opens no connection


def api(api_base: str = "http://127.0.0.1:1/v1") -> BackendConfig:
    return BackendConfig(
        model="openai/fake", api_base=api_base, api_key_env="FAKE_KEY", constrained=False, logprobs=False, num_retries=0
    )


@pytest.fixture(autouse=True)
def no_cache_chosen_yet(tmp_path, monkeypatch):
    """No cache opened before, no config file, no cache variables but a folder for the plain default."""
    monkeypatch.setattr(cache_module, "_defaults", {})
    monkeypatch.setattr(cache_module, "_file_settings", None)
    for name in ("REFLECTAGENT_CONFIG", "REFLECTAGENT_CACHE_URL", "REFLECTAGENT_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REFLECTAGENT_CACHE_DIR", str(tmp_path / "default"))
    monkeypatch.setenv("FAKE_KEY", "k")
    monkeypatch.chdir(tmp_path)


def test_a_backend_blocks_cache_url_is_the_cache_in_force(tmp_path):
    settings = Settings(backends={"api": api()}, cache_url=URL)
    with backend("api", settings):
        inside = current_cache()
        assert isinstance(inside.store, RedisStore) and inside.store.url == URL
        assert current_cache() is inside  # one cache per place, not one per step
    outside = current_cache()
    assert isinstance(outside.store, DiskStore) and outside.directory == tmp_path / "default"


def test_a_backend_blocks_judgments_are_kept_in_its_cache_dir(tmp_path):
    settings = Settings(backends={"api": api()}, cache_dir=str(tmp_path / "configured"))
    with Engine(delay_s=0) as engine:
        settings.backends["api"] = api(engine.api_base)
        with backend("api", settings):
            judge_pairs(named_program("genrm-both"), [PAIR], progress=False)
        assert len(engine.calls) == 2
    assert len(JudgmentCache(tmp_path / "configured")) == 2
    assert not (tmp_path / "default").exists()


def test_the_config_files_cache_is_read_once_and_an_explicit_cache_still_wins(tmp_path, monkeypatch):
    config = tmp_path / "reflectagent.toml"
    config.write_text(f'cache_url = "{URL}"\n')
    assert current_cache().store.url == URL
    config.write_text("cache = false\n")  # not read again
    assert current_cache().store.url == URL and caching()
    with use_cache(JudgmentCache(tmp_path / "mine")) as mine:
        assert current_cache() is mine


def test_the_commands_and_the_library_place_the_cache_alike(tmp_path, monkeypatch):
    settings = Settings(cache_url=URL, cache_dir=str(tmp_path / "configured"))
    assert open_cache(settings, None, check=False).store.url == URL
    assert open_cache(settings, tmp_path / "flag", check=False).directory == tmp_path / "flag"  # --cache-dir first
    monkeypatch.setenv("REFLECTAGENT_CACHE", "off")  # as the README says, for the commands too
    assert not open_cache(settings, None, check=False).enabled
    with backend("api", Settings(backends={"api": api()})):
        assert not current_cache().enabled and not caching()


def test_the_loops_settings_with_a_served_backend_keep_the_cache_url(tmp_path):
    from reflectagent.finetune.loop import Loop
    from reflectagent.finetune.loop_config import LoopConfig

    settings = Settings(backends={"api": api()}, cache_url=URL, cache_dir=str(tmp_path / "configured"), cache=False)
    loop = Loop(
        LoopConfig(output_dir=str(tmp_path / "loop"), train_data="t.jsonl", unseen_data="u.jsonl"),
        settings,
        progress=False,
    )
    served = loop._with(teacher=api("http://127.0.0.1:2/v1"))
    assert served.model_dump(exclude={"backends"}) == settings.model_dump(exclude={"backends"})
    assert served.backends == {**settings.backends, "teacher": api("http://127.0.0.1:2/v1")}
    with backend("teacher", served):
        assert current_cache().store.url == URL


def test_settings_given_explicitly_place_the_cache_outside_a_block_and_no_config_file_is_read(tmp_path):
    """A caller that passes its settings (``resolve_backend("api", S)``, as ``run_eval(..., settings=S)`` and
    ``Rewarder(settings=S)`` do) and runs under ``dspy.context(lm=...)`` got the config file's cache, and a
    ConfigError where an unrelated ./reflectagent.toml was invalid: the LM in force now carries its settings."""
    import dspy

    (tmp_path / "reflectagent.toml").write_text("cache = [not valid\n")
    configured = resolve_backend("api", Settings(backends={"api": api()}, cache_dir=str(tmp_path / "configured")))
    redis = resolve_backend("api", Settings(backends={"api": api()}, cache_url=URL))
    off = resolve_backend("api", Settings(backends={"api": api()}, cache=False))
    with dspy.context(lm=configured):
        assert current_cache().directory == tmp_path / "configured" and caching()
    with dspy.context(lm=redis):
        assert current_cache().store.url == URL
    with dspy.context(lm=off):
        assert not current_cache().enabled and not caching()
    with backend("api", Settings(backends={"api": api()}, cache_dir=str(tmp_path / "block"))), dspy.context(lm=redis):
        assert current_cache().directory == tmp_path / "block"  # an open block's settings come first
    with pytest.raises(ConfigError):  # with no block and no LM of ours, the config file is read, as before
        current_cache()


def test_judging_under_an_lm_resolved_from_explicit_settings_keeps_steps_where_they_say(tmp_path):
    import dspy

    with Engine(delay_s=0) as engine:
        lm = resolve_backend(
            "api", Settings(backends={"api": api(engine.api_base)}, cache_dir=str(tmp_path / "configured"))
        )
        with dspy.context(lm=lm):
            judge_pairs(named_program("genrm-both"), [PAIR], progress=False)
        assert len(engine.calls) == 2
    assert len(JudgmentCache(tmp_path / "configured")) == 2
    assert not (tmp_path / "default").exists()


def test_the_default_cache_follows_reflectagent_cache_dir(tmp_path, monkeypatch):
    assert current_cache().directory == tmp_path / "default"
    monkeypatch.setenv("REFLECTAGENT_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert current_cache().directory == tmp_path / "elsewhere"


def test_threads_asking_at_once_open_one_default_cache(monkeypatch):
    import threading
    import time

    opened = []
    real = cache_module.configured_cache

    def slow(settings):
        time.sleep(0.05)  # long enough for every thread to find no cache yet
        opened.append(real(settings))
        return opened[-1]

    monkeypatch.setattr(cache_module, "configured_cache", slow)
    start, got = threading.Barrier(8), []

    def ask():
        start.wait()
        got.append(current_cache())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(opened) == 1 and len(got) == 8 and all(cache is opened[0] for cache in got)
