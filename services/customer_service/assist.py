"""Agent assist in one API process: the models every live call uses, and what the calls share.

:func:`assist_lifespan` (the cs app's lifespan) loads, through the shared runtime:

- ``cs-vad-8k`` / ``cs-vad-16k``: silero VAD as streaming models (:mod:`.vad`), one session per
  call track, so 32 ms windows of concurrent calls share batches;
- ``cs-asr``: pocketsphinx with the domain language model built from the shipped call scripts
  and simulated knowledge base (:mod:`.asr`), which no tenant's data goes into; a tenant with
  articles gets its own model of the scripts and its articles, rebuilt when they change
  (:mod:`.tenant_lm`), which its calls and uploads are decoded with;
- ``cs-emotion``: the audio + text emotion model (:mod:`.model`), utterances of concurrent calls
  batched together;

and holds the per-process :class:`~.pipeline.AssistServices`: the runtime's streaming sessions,
the knowledge index (each tenant's articles, synced from the database on use), and the event feed.
Live calls left open by a process that died are closed as ``partial`` at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from model_runtime import ModelRuntime, ModelSpec, StreamingSessions, get_runtime
from services.customer_service import store
from services.customer_service.asr import (
    AsrRequest,
    AsrStep,
    Transcript,
    asr_model_spec,
    cached_domain_lm,
    domain_texts,
    kept_domain_lm,
)
from services.customer_service.pipeline import AssistServices, EmotionReading, TenantKnowledge, Transcription
from services.customer_service.tenant_lm import TenantLanguageModels, build_tenant_lm
from services.customer_service.vad import vad_streaming_model
from shared.config import get_settings
from shared.db import session_scope, utcnow
from shared.errors import NotReady
from shared.feeds import event_feed
from shared.processes import DedicatedProcess

logger = logging.getLogger("tessera.cs.assist")

ASR_MODEL = "cs-asr"
EMOTION_MODEL = "cs-emotion"
VAD_RATES = (8000, 16000)
STALE_CALL_AFTER = timedelta(minutes=10)
"""A live call whose stream has been silent this long at start-up belonged to a dead process."""

_services: AssistServices | None = None
_builder: DedicatedProcess | None = None
"""Where the process builds its language models (the shipped one at start, then tenants')."""
_knowledge = TenantKnowledge()


class RuntimeAnalyzers:
    """The pipeline's two models, served by the shared runtime (batched across calls)."""

    def __init__(self, runtime: ModelRuntime, language_models: TenantLanguageModels | None = None, *,
                 model_name: str = ASR_MODEL) -> None:
        self.runtime = runtime
        self.language_models = language_models
        self.model_name = model_name

    async def transcribe(self, samples: npt.NDArray[np.int16], sample_rate: int,
                         tenant_id: str | None = None) -> Transcription:
        """Speech-to-text of one utterance through ``cs-asr``, with the tenant's language model
        when it has one."""
        lm = None if tenant_id is None or self.language_models is None else self.language_models.current(tenant_id)
        transcript: Transcript = await self.runtime.predict(self.model_name, AsrRequest(samples, sample_rate, lm))
        return Transcription(text=transcript.text)

    async def asr_step(self, step: AsrStep) -> Any:
        """One step of an utterance decoded while it is spoken, through ``cs-asr``."""
        return await self.runtime.predict(self.model_name, step)

    async def emotion(self, samples: npt.NDArray[np.int16] | None, sample_rate: int,
                      text: str | None) -> EmotionReading:
        """Emotion of one utterance through ``cs-emotion`` (audio, text or both)."""
        from services.customer_service.model import EmotionRequest

        reading: EmotionReading = await self.runtime.predict(EMOTION_MODEL, EmotionRequest(samples, sample_rate, text))
        return reading


def process_knowledge() -> TenantKnowledge:
    """The process's knowledge base, ready before the models are (the API edits it meanwhile)."""
    return _knowledge


def assist_services() -> AssistServices:
    """The process's assist services; 503 (not ready) before the app has started them."""
    if _services is None:
        if not get_settings().cs_stream_models:
            raise NotReady("this process serves no call streams (TESSERA_CS_STREAM_MODELS=false)")
        raise NotReady("the customer-service models are loading")
    return _services


def language_model_cache_dir() -> Path:
    """Where the process keeps the domain language models it built (``<data_dir>/cache/cs-language-models``),
    so that a restart reads them back instead of building them again."""
    return get_settings().data_dir / "cache" / "cs-language-models"


async def start_assist(runtime: ModelRuntime | None = None) -> AssistServices:
    """Load the models and build the process's assist services (see the module docstring)."""
    global _services
    runtime = runtime or get_runtime()
    sessions = StreamingSessions(runtime)
    for rate in VAD_RATES:
        await sessions.load(vad_streaming_model(rate))
    global _builder
    _builder = _builder or DedicatedProcess()
    cache_dir, texts = language_model_cache_dir(), domain_texts()
    domain_lm = await asyncio.to_thread(kept_domain_lm, texts, cache_dir)  # a restart: read back, no process
    if domain_lm is None:
        domain_lm = await _builder.run(cached_domain_lm, texts, cache_dir)
    # the specs import torch and transformers and read the tokenizer: in a thread, so that the gateway's
    # loop keeps answering while the models load
    await runtime.load(await asyncio.to_thread(asr_model_spec, ASR_MODEL, domain_lm,
                                               processes=get_settings().cs_asr_processes))
    await runtime.load(await asyncio.to_thread(_emotion_spec))
    closed = await asyncio.to_thread(_close_abandoned_calls)
    if closed:
        logger.warning("closed %d live calls left open by a process that stopped (kept as partial)", closed)
    language_models = TenantLanguageModels(builder=_builder,
                                           build=functools.partial(build_tenant_lm, cache_dir=cache_dir))
    _knowledge.on_synced = language_models.knowledge_synced
    analyzers = RuntimeAnalyzers(runtime, language_models)
    _services = AssistServices(sessions=sessions, analyzers=analyzers, knowledge_base=_knowledge, feed=event_feed(),
                               asr_step=analyzers.asr_step, language_model=language_models.current)
    return _services


def _emotion_spec() -> ModelSpec:
    from services.customer_service.model import emotion_model_spec

    return emotion_model_spec(name=EMOTION_MODEL)


async def stop_assist() -> None:
    """Close every session and unload the models, also those a start cut short had loaded (a gateway
    stopped while the models were still loading: its decoder processes must not outlive it)."""
    global _services
    services, _services = _services, None
    runtime = get_runtime() if services is None else services.sessions.runtime
    if services is not None:
        _knowledge.on_synced = None
        if isinstance(services.analyzers, RuntimeAnalyzers) and services.analyzers.language_models is not None:
            await services.analyzers.language_models.close()
        await services.sessions.close()
    for name in (ASR_MODEL, EMOTION_MODEL):
        with contextlib.suppress(Exception):
            await runtime.unload(name)
    global _builder
    if _builder is not None:
        await _builder.close()
        _builder = None


@contextlib.asynccontextmanager
async def assist_lifespan(_app: object) -> AsyncIterator[None]:
    """The cs app's lifespan: the models load in the background, so the app (and the gateway with
    every vertical) answers at once; streams are refused with 1013 and ``/readyz`` says not ready
    until they are loaded."""
    if not get_settings().cs_stream_models:
        logger.info("customer-service models not loaded (TESSERA_CS_STREAM_MODELS=false): streams are refused")
        yield
        return
    loading = asyncio.create_task(_start_logged())
    try:
        yield
    finally:
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        await stop_assist()


async def _start_logged() -> None:
    started = time.perf_counter()
    try:
        await start_assist()
    except FileNotFoundError as missing:  # no artifact shipped or trained: say which, no traceback
        logger.error("the customer-service models could not be loaded (%s); streams are refused", missing)
        return
    except Exception:
        logger.exception("the customer-service models could not be loaded; streams are refused")
        return
    logger.info("customer-service models loaded in %.1f s", time.perf_counter() - started)


def check_assist_ready() -> None:
    """Readiness check: raises :class:`~shared.errors.NotReady` until the models are loaded (a
    replica configured without them is ready without them)."""
    if get_settings().cs_stream_models:
        assist_services()


def _close_abandoned_calls() -> int:
    with session_scope() as session:
        return store.abandon_stale_calls(session, idle_since=utcnow() - STALE_CALL_AFTER)
