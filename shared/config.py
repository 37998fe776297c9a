"""One settings object for the whole suite.

Every value comes from the environment (prefix ``TESSERA_``) or a ``.env`` file, with embedded
defaults that run on one machine with nothing installed: a SQLite file database, a SQLite-backed
Celery broker, a local artifact directory and automatic CPU/GPU choice. Scaling out means changing
URLs (``TESSERA_DATABASE_URL=postgresql+psycopg://...``, ``TESSERA_BROKER_URL=redis://...``), never code.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, computed_field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PLACEHOLDER_SECRET = "change-me-in-production"

class Settings(BaseSettings):
    """Suite-wide settings, read once per process through :func:`get_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="TESSERA_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    environment: Literal["development", "test", "production"] = "development"
    data_dir: Path = Field(default=Path(".tessera"), description="SQLite files, broker, uploads")
    models_dir: Path = Field(default=Path("models"), description="shipped model artifacts")
    verticals_package: str = Field(default="services", description="the package whose sub-packages with a "
                                   "`vertical.py` are the verticals (shared.verticals)")

    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite file if unset")
    broker_url: str | None = Field(default=None, description="Celery broker; embedded SQLite if unset")
    result_backend: str | None = Field(default=None, description="Celery results; database if unset")
    broker_polling_interval_s: float = Field(default=0.1, gt=0, description="embedded broker polling")
    task_lease_s: float = Field(default=120.0, gt=0, description="a job unfinished this long is retried")
    job_sweep_interval_s: float = Field(default=15.0, gt=0, description="how often stalled jobs are swept")
    redis_url: str | None = Field(default=None, description="shared fast state (e.g. velocity counters)")
    recorder_in_api: bool = Field(default=True, description="each API process drains the write-behind "
                                  "streams itself; false when `tessera recorder <vertical>` runs beside it")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_reload_poll_s: float = Field(default=15.0, gt=0, description="how often a promoted model is looked for")
    torch_threads: int = Field(default=1, ge=1, description="intra-op threads per model worker thread")
    fraud_model_process: bool = Field(default=True, description="each API process serves the fraud model from a "
                                      "child process of its own (its CPU off the serving loop's core)")

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = Field(default=1, ge=1, description="API processes started by `tessera up`")
    hot_routes: bool = Field(default=True, description="serve hot endpoints (the fraud webhook) as plain ASGI")
    log_level: str = "INFO"
    log_json: bool = True
    access_log: bool = Field(default=True, description="one log line per HTTP request (method, path, status, "
                             "duration, request id, tenant); off in benchmarks")

    secret_key: str = Field(default=PLACEHOLDER_SECRET, description="pepper for hashing API keys")
    require_api_keys: bool = Field(default=True, description="refuse requests without a valid key")
    webhook_tolerance_s: int = Field(default=300, ge=1, description="signature replay window")
    callback_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated host names, addresses or CIDR networks that "
        "tenants' callback URLs may reach although not public (loopback, private, link-local): "
        "e.g. `127.0.0.1,10.20.0.0/16,hooks.internal`")

    nodule_ae_title: str = Field(default="TESSERA", min_length=1, max_length=16, description="the nodule "
                                 "vertical's DICOM AE title (its C-STORE listener)")
    nodule_dicom_host: str = Field(default="127.0.0.1", description="address the DICOM listener binds")
    nodule_dicom_port: int = Field(default=11112, ge=0, le=65535, description="the DICOM listener's port")
    nodule_dicom_listener: bool = Field(default=True, description="`tessera up` starts the DICOM listener")
    nodule_allowed_calling_aets: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated calling AE titles the DICOM listener accepts; "
        "empty accepts any, which only the development and test environments allow")
    nodule_calling_aet_tenants: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="comma-separated `AE_TITLE=tenant` pairs: whose studies an "
        "association stores (others: `nodule_default_tenant`)")
    nodule_default_tenant: str = Field(default="default", description="tenant of DICOM associations whose "
                                       "calling AE title is not in `nodule_calling_aet_tenants`")
    nodule_quiet_period_s: float = Field(default=10.0, gt=0, description="a series is complete after this "
                                         "long without a new instance, then analysed")
    nodule_storage_dir: Path | None = Field(default=None, description="where received DICOM files are "
                                            "stored; `<data_dir>/nodule` if unset")
    nodule_pacs_host: str | None = Field(default=None, description="the PACS that receives the nodule results "
                                         "(SR, SEG, key images) by C-STORE; unset: results are not sent")
    nodule_pacs_port: int = Field(default=104, ge=1, le=65535, description="the PACS's DICOM port")
    nodule_pacs_ae_title: str = Field(default="PACS", min_length=1, max_length=16, description="the PACS's "
                                      "(called) AE title; ours is `nodule_ae_title`")
    cs_stream_models: bool = Field(default=True, description="load the speech and emotion models at start "
                                   "(call streams and utterance analysis need them); false for a cs replica that "
                                   "only serves the knowledge base, settings and call records")
    cs_asr_processes: int = Field(default=2, ge=1, le=32, description="speech-to-text decoder processes per "
                                  "cs API process: utterances of concurrent calls decode in parallel on as many "
                                  "cores")
    cs_acoustic_model: str = Field(default="v1", pattern=r"^[A-Za-z0-9._-]+$",
                                   description="speech-to-text acoustic model: a version under "
                                   "`<models_dir>/cs/asr` (pocketsphinx's en-US adapted to the telephone line) "
                                   "or `stock` for pocketsphinx's own")
    cs_stream_idle_timeout_s: float = Field(default=30.0, gt=0, description="a call stream that sends nothing "
                                            "for this long (no audio, no ping) is closed (1008) and its call "
                                            "kept as partial")
    cs_public_stream_base: str | None = Field(default=None, description="the public origin call platforms "
                                              "connect to, as written in the TwiML (`wss://cs.example.com`); "
                                              "Twilio signs that URL. Default: `wss://` and the Host header")
    iiot_storage_dir: Path | None = Field(default=None, description="where ingestion files are kept while "
                                          "their job runs; `<data_dir>/iiot` if unset")
    iiot_max_upload_bytes: int = Field(default=20 * 1024**3, gt=0, description="largest ingestion file "
                                       "accepted (after gzip decompression, when gzipped)")
    iiot_mqtt_url: str | None = Field(default=None, description="MQTT broker the readings subscriber reads "
                                      "(`mqtt://host:1883`); unset: `tessera up` starts no subscriber")
    iiot_mqtt_topic_prefix: str = Field(default="tessera/iiot", description="readings arrive on "
                                        "`<prefix>/<tenant>/<plant>/<line>/<asset>`; the broker's ACLs "
                                        "decide which gateway may publish under which tenant")
    iiot_mqtt_client_id: str | None = Field(default=None, max_length=128, description="the subscriber's MQTT "
                                            "client id (its persistent session); unset: derived from the prefix. "
                                            "Give each replica its own")
    iiot_mqtt_share_group: str | None = Field(default=None, pattern=r"^[^/+#]+$", description="replicas that "
                                              "set the same group split the messages (MQTT 5 shared subscription "
                                              "`$share/<group>/…`); unset: one subscriber takes every message")
    iiot_scoring_interval_s: float = Field(default=300.0, gt=0, description="beat scores every asset of "
                                           "every tenant this often")

    @field_validator("nodule_allowed_calling_aets", mode="before")
    @classmethod
    def _comma_separated_aets(cls, value: object) -> object:
        if isinstance(value, str):
            return [entry.strip() for entry in value.split(",") if entry.strip()]
        return value

    @field_validator("nodule_calling_aet_tenants", mode="before")
    @classmethod
    def _aet_tenant_pairs(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [entry.split("=", 1) for entry in value.split(",") if entry.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError("nodule_calling_aet_tenants takes `AE_TITLE=tenant` pairs separated by commas")
            return {aet.strip(): tenant.strip() for aet, tenant in pairs}
        return value

    @field_validator("callback_allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [entry.strip() for entry in value.split(",") if entry.strip()]
        return value

    @field_validator("callback_allowed_hosts")
    @classmethod
    def _networks_parse(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            if "/" in entry or ":" in entry:
                ipaddress.ip_network(entry, strict=False)  # a ValueError names the bad entry
        return entries

    @computed_field  # type: ignore[prop-decorator]
    @property
    def sqlalchemy_url(self) -> str:
        """The database URL, defaulting to a SQLite file under ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'tessera.db').resolve()}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def celery_broker_url(self) -> str:
        """The broker URL, defaulting to kombu's SQLAlchemy transport on a SQLite file."""
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def celery_result_backend(self) -> str:
        """Where task results go: Redis when the broker is Redis, else a database file."""
        if self.result_backend:
            return self.result_backend
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return f"db+sqlite:///{(self.data_dir / 'results.db').resolve()}"

    @property
    def uses_embedded_broker(self) -> bool:
        """True when the broker is the single-machine SQLite transport."""
        return self.celery_broker_url.startswith("sqla+")

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        if self.environment == "production" and self.secret_key == PLACEHOLDER_SECRET:
            raise ValueError("TESSERA_SECRET_KEY is still the placeholder; set a real secret in production")
        return self

    def ensure_dirs(self) -> None:
        """Create the local data directory (SQLite files, uploads) if missing."""
        self.data_dir.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (cached; tests clear with ``get_settings.cache_clear()``)."""
    settings = Settings()
    settings.ensure_dirs()
    return settings
