"""Settings: embedded defaults, URLs from the environment, placeholder secrets refused in production."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.config import Settings


def test_embedded_defaults_need_no_server(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.sqlalchemy_url == f"sqlite:///{tmp_path.resolve() / 'tessera.db'}"
    assert settings.celery_broker_url.startswith("sqla+sqlite:///")
    assert settings.uses_embedded_broker
    assert settings.device == "auto"


def test_urls_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_DATABASE_URL", "postgresql+psycopg://db/tessera")
    monkeypatch.setenv("TESSERA_BROKER_URL", "redis://cache:6379/0")
    settings = Settings()
    assert settings.sqlalchemy_url == "postgresql+psycopg://db/tessera"
    assert settings.celery_result_backend == "redis://cache:6379/0"
    assert not settings.uses_embedded_broker


def test_placeholder_secret_is_refused_in_production() -> None:
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(environment="production")
    assert Settings(environment="production", secret_key="s3cret-value").environment == "production"
