"""Configuration (issue #2): the shipped files load, and every mistake stops start-up with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.paths import ROOT
from worker.errors import ConfigError
from worker.settings import load_settings

KEYS = {
    "OPENAI_API_KEY": "sk-o",
    "ANTHROPIC_API_KEY": "sk-a",
    "GEMINI_API_KEY": "g",
    "COHERE_API_KEY": "c",
    "PERPLEXITYAI_API_KEY": "p",
}
DESIGN_AGENTS = {"writer", "critic", "editor", "researcher", "fact-checker"}


def edit(folder: Path, file: str, change) -> None:
    path = folder / file
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def test_shipped_production_config_loads_with_keys_in_the_environment():
    settings = load_settings(ROOT / "config", environ=KEYS)
    assert set(settings.llm.agent_models) == DESIGN_AGENTS
    providers = {d.litellm_params["model"].split("/")[0] for d in settings.llm.models}
    assert providers >= {"openai", "anthropic", "gemini", "cohere_chat", "perplexity"}
    assert not settings.offline and not any(d.is_mock for d in settings.llm.models)
    assert "sk-o" not in repr(settings)  # secrets stay references until the routes are built


def test_shipped_offline_profile_loads_without_keys():
    settings = load_settings(ROOT / "config" / "offline", environ={})
    assert settings.offline and all(d.is_mock for d in settings.llm.models)
    assert set(settings.llm.agent_models) == DESIGN_AGENTS


def test_shipped_models_are_routable_by_litellm():
    from worker.llm import LLM

    settings = load_settings(ROOT / "config", environ=KEYS)
    llm = LLM.build(settings.llm, environ=KEYS)
    assert set(llm.routes.groups) == settings.llm.model_names


def test_environment_overrides_urls(config_copy):
    env = {**KEYS, "AMQP_URL": "amqp://u:p@broker:5672/vh", "REDIS_URL": "redis://cache:6379/3"}
    settings = load_settings(config_copy, environ=env)
    assert settings.bus.url.get_secret_value() == "amqp://u:p@broker:5672/vh"
    assert settings.redis.url.get_secret_value() == "redis://cache:6379/3"
    assert "u:p@" not in repr(settings)


def test_config_dir_from_environment(config_copy):
    settings = load_settings(None, environ={**KEYS, "WORKER_CONFIG_DIR": str(config_copy)})
    assert settings.config_dir == config_copy


@pytest.mark.parametrize(
    ("file", "change", "key", "expected"),
    [
        ("llm.yaml", lambda d: d["llm"].pop("num_retries"), "llm.num_retries", "required key is missing"),
        ("llm.yaml", lambda d: d["llm"].update(timeout="soon"), "llm.timeout", "valid number"),
        ("llm.yaml", lambda d: d["llm"].update(temperatur=0.2), "llm.temperatur", "Extra inputs"),
        (
            "llm.yaml",
            lambda d: d["llm"]["agent_models"].update(writer="gpt-9"),
            "llm.agent_models.writer",
            "'gpt-9' is not among llm.models",
        ),
        (
            "llm.yaml",
            lambda d: d["llm"]["models"][0]["model_info"].pop("output_cost_per_token"),
            "llm.models.0.model_info.output_cost_per_token",
            "required key is missing",
        ),
        (
            "llm.yaml",
            lambda d: d["llm"]["budget"].pop("max_cost_per_day"),
            "llm.budget.max_cost_per_day",
            "required key is missing",
        ),
        (
            "llm.yaml",
            lambda d: d["llm"]["models"][1]["litellm_params"].update(mock_response="hi"),
            "llm.models.1.litellm_params.mock_response",
            "only allowed with 'offline: true'",
        ),
        ("bus.yaml", lambda d: d["bus"].pop("prefetch"), "bus.prefetch", "required key is missing"),
        ("bus.yaml", lambda d: d.update(extra={}), "extra", "unknown top key"),
        ("redis.yaml", lambda d: d["redis"].update(key_prefix=""), "redis.key_prefix", "at least 1"),
    ],
)
def test_mistakes_name_the_file_and_key(config_copy, file, change, key, expected):
    edit(config_copy, file, change)
    with pytest.raises(ConfigError) as caught:
        load_settings(config_copy, environ=KEYS)
    assert caught.value.file.endswith(file)
    assert caught.value.key == key
    assert expected in caught.value.problem


def test_missing_secret_names_the_variable(config_copy):
    env = {k: v for k, v in KEYS.items() if k != "COHERE_API_KEY"}
    with pytest.raises(ConfigError, match="environment variable COHERE_API_KEY is not set"):
        load_settings(config_copy, environ=env)


def test_unroutable_model_name_is_a_start_up_error(config_copy):
    from worker.llm import LLM

    edit(
        config_copy, "llm.yaml", lambda d: d["llm"]["models"][0]["litellm_params"].update(model="gemini-pro")
    )
    settings = load_settings(config_copy, environ=KEYS)
    with pytest.raises(ConfigError, match="litellm cannot route 'gemini-pro'"):
        LLM.build(settings.llm, environ=KEYS)


def test_a_provider_that_reports_no_usage_is_a_start_up_error(config_copy):
    """litellm 1.82.6's aiohttp_openai/ answers with zero usage: its calls would escape the budgets."""
    from worker.llm import LLM

    edit(
        config_copy,
        "llm.yaml",
        lambda d: d["llm"]["models"][0]["litellm_params"].update(model="aiohttp_openai/gpt-4.1-mini"),
    )
    settings = load_settings(config_copy, environ=KEYS)
    with pytest.raises(ConfigError, match=r"llm\.models\.0\.litellm_params\.model.*returns no token usage"):
        LLM.build(settings.llm, environ=KEYS)


def test_cli_stops_with_one_line_and_exit_code_2(config_copy):
    edit(config_copy, "llm.yaml", lambda d: d["llm"].pop("default_model"))
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "--config", str(config_copy), "run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **KEYS},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "llm.yaml: llm.default_model: required key is missing" in lines[0]


def test_production_config_without_keys_refuses_to_start():
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "--config", str(ROOT / "config"), "run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert "OPENAI_API_KEY is not set" in proc.stderr
