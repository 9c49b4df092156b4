"""Typed configuration from the environment."""

import pytest

from dovecote.gateway.state import GatewayConfig
from dovecote.libs.config import BaseConfig, env_name, load_config
from dovecote.libs.errors import ConfigError


def test_defaults_when_the_environment_is_empty() -> None:
    config = load_config(GatewayConfig, {})
    assert config.http_port == 8080
    assert config.database_url is None


def test_values_are_converted_from_strings() -> None:
    config = load_config(GatewayConfig, {
        "DOVECOTE_HTTP_PORT": "9090",
        "DOVECOTE_SHUTDOWN_GRACE_S": "2.5",
        "DATABASE_URL": "postgresql://x/y",
    })
    assert (config.http_port, config.shutdown_grace_s) == (9090, 2.5)
    assert config.database_url == "postgresql://x/y"


def test_a_bad_value_names_its_variable() -> None:
    with pytest.raises(ConfigError, match="DOVECOTE_HTTP_PORT"):
        load_config(GatewayConfig, {"DOVECOTE_HTTP_PORT": "eighty"})


def test_a_value_out_of_range_is_refused() -> None:
    with pytest.raises(ConfigError, match="DOVECOTE_HTTP_PORT"):
        load_config(GatewayConfig, {"DOVECOTE_HTTP_PORT": "70000"})
    with pytest.raises(ConfigError, match="DOVECOTE_LOG_LEVEL"):
        load_config(BaseConfig, {"DOVECOTE_LOG_LEVEL": "loud"})


def test_a_missing_required_setting_is_named() -> None:
    class Needs(BaseConfig, kw_only=True):
        api_secret: str

    with pytest.raises(ConfigError, match="missing required setting DOVECOTE_API_SECRET"):
        load_config(Needs, {})


def test_env_names_follow_the_class_overrides() -> None:
    assert env_name(GatewayConfig, "database_url") == "DATABASE_URL"
    assert env_name(GatewayConfig, "http_host") == "DOVECOTE_HTTP_HOST"
