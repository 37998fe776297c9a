"""Per-tenant domain language models: built from the shipped call scripts and the tenant's own
knowledge base when it changes (one build for a burst of edits, a bounded number kept), shipped to
the decoder processes once per version (a bounded number held there), and used for that tenant's
calls only — through the call pipeline and the runtime, with real decoder processes.

The tenant's word is "trampoline": in cmudict, in neither the call scripts nor the 2,000 most
frequent generic words, so only a model built from tenant A's articles can recognise it. Speech is
espeak-ng through the simulated telephone line; transcripts are checked for the word, not exact text.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
import pytest

from model_runtime import ModelRuntime, StreamingSessions
from services.customer_service.asr import (
    AsrRequest,
    AsrStep,
    DomainLm,
    KeyedLm,
    LmNotHeld,
    RecognizerPool,
    Transcript,
    asr_model_spec,
    build_domain_lm,
    domain_texts,
    script_texts,
    sentence_words,
)
from services.customer_service.assist import RuntimeAnalyzers
from services.customer_service.assist_schemas import ArticleIn
from services.customer_service.knowledge import Article, KnowledgeIndex
from services.customer_service.labels import EMOTIONS
from services.customer_service.pipeline import AssistServices, CallPipeline, EmotionReading, TenantKnowledge
from services.customer_service.protocols.base import AudioChunk, CallEnded, CallStarted, Participant, TrackFormat
from services.customer_service.tenant_lm import TenantLanguageModels, build_tenant_lm, knowledge_version
from services.customer_service.vad import vad_model_name, vad_streaming_model
from tests.conftest import apply_stack_in_process, sqlite_stack_at
from tests.scaffold import migrate

WORD = "trampoline"
SPOKEN = "My trampoline is broken."
TENANT_A, TENANT_B = "cs-lm-a", "cs-lm-b"
ASR_TEST_MODEL = "cs-asr-tenants"
ARTICLES_A = (ArticleIn(id="trampolines", title="Trampoline returns",
                        body="A trampoline can be returned within thirty days. Every trampoline has a two year "
                             "warranty. If your trampoline is broken we send a new trampoline."),)
ARTICLES_B = (ArticleIn(id="garden", title="Garden furniture",
                        body="Garden chairs and tables are delivered in five days. A broken chair is replaced "
                             "free of charge."),)


def indexed(tenant_id: str, articles: tuple[ArticleIn, ...]) -> list[Article]:
    return [Article(tenant_id, article.id or "", article.title, article.body, tuple(article.tags), article.reply)
            for article in articles]


@pytest.fixture(scope="module")
def tenant_models() -> dict[str, KeyedLm]:
    return {TENANT_A: build_tenant_lm(TENANT_A, indexed(TENANT_A, ARTICLES_A)),
            TENANT_B: build_tenant_lm(TENANT_B, indexed(TENANT_B, ARTICLES_B))}


@pytest.fixture(scope="module")
def shipped_lm() -> DomainLm:
    return build_domain_lm(domain_texts(), generic_words=300)


@pytest.fixture(scope="module")
def spoken() -> list[npt.NDArray[np.int16]]:
    """The tenant's word in a sentence, by a US male and a US female espeak-ng voice."""
    simulate = pytest.importorskip("services.customer_service.simulate")
    if simulate.espeak_path() is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng): no speech to test with")
    from services.customer_service.evaluation import telephone_speech

    return [telephone_speech(SPOKEN, voice)[0] for voice in (0, 1)]


def heard(texts: list[str]) -> bool:
    return any(WORD in text.split() for text in texts)


# --- what a tenant's model is built from ---------------------------------------------------------------

def test_a_tenant_model_is_the_scripts_and_its_own_articles_only(tenant_models: dict[str, KeyedLm]) -> None:
    a, b = tenant_models[TENANT_A].lm, tenant_models[TENANT_B].lm
    script_words = {word for text in script_texts() for words in sentence_words(text) for word in words}
    assert WORD not in script_words
    assert WORD in a.vocabulary and WORD in a.dictionary.split()
    # tenant B's model, ARPA text and dictionary know nothing of tenant A's articles
    assert WORD not in b.vocabulary and WORD not in b.arpa.split() and WORD not in b.dictionary.split()
    assert {"refund", "order", "router"} <= a.domain_words & b.domain_words  # both have the shipped scripts
    assert "garden" in b.domain_words


def test_the_version_follows_the_text_and_tenants_do_not_mix() -> None:
    articles = indexed(TENANT_A, ARTICLES_A)
    retagged = [Article(a.tenant_id, a.article_id, a.title, a.body, ("apology",), a.reply) for a in articles]
    edited = [Article(a.tenant_id, a.article_id, a.title, a.body + " Ask for a spring cover.") for a in articles]
    assert knowledge_version(articles) == knowledge_version(retagged) != knowledge_version(edited)
    with pytest.raises(ValueError, match="another tenant"):
        build_tenant_lm(TENANT_B, articles)


# --- rebuilt on change, debounced, bounded ----------------------------------------------------------------

def test_a_tenant_model_follows_its_knowledge_base_with_one_build_per_burst_and_a_bounded_cache() -> None:
    built: list[tuple[str, tuple[str, ...]]] = []

    def fake_build(tenant_id: str, articles: list[Article]) -> KeyedLm:
        built.append((tenant_id, tuple(article.article_id for article in articles)))
        return KeyedLm(f"{tenant_id}@{knowledge_version(articles)}", cast(DomainLm, None))

    def article(tenant_id: str, article_id: str) -> Article:
        return Article(tenant_id, article_id, f"Title {article_id}", f"Body of article {article_id}.")

    async def scenario() -> None:
        index = KnowledgeIndex()
        models = TenantLanguageModels(debounce_s=0.05, max_tenants=2, build=fake_build)  # type: ignore[arg-type]
        models.knowledge_synced("a", index)
        assert await models.settled("a") is None and not built  # no article: the shipped model
        index.upsert(article("a", "1"))
        models.knowledge_synced("a", index)
        first = await models.settled("a")  # a tenant's first model: at once
        assert first is not None and built == [("a", ("1",))]
        for number in range(2, 6):  # a burst of edits, each synced: one build after it
            index.upsert(article("a", str(number)))
            models.knowledge_synced("a", index)
        latest = await models.settled("a")
        assert built[1:] == [("a", ("1", "2", "3", "4", "5"))]
        assert latest is not None and latest.key == f"a@{knowledge_version(index.articles('a'))}" != first.key
        models.knowledge_synced("a", index)  # nothing changed: nothing built
        assert await models.settled("a") is latest and len(built) == 2
        for tenant_id in ("b", "c"):  # a third tenant pushes out the least recently used
            index.upsert(article(tenant_id, "1"))
            models.knowledge_synced(tenant_id, index)
            await models.settled(tenant_id)
        assert models.tenants() == ["b", "c"] and models.current("a") is None
        models.knowledge_synced("a", index)  # its next sync builds it again
        assert await models.settled("a") == latest and models.tenants() == ["c", "a"]
        for number in range(1, 6):
            index.remove("a", str(number))
        models.knowledge_synced("a", index)  # no article left: back to the shipped model
        assert await models.settled("a") is None
        await models.close()

    asyncio.run(scenario())


# --- in the decoder processes ---------------------------------------------------------------------------

def decode_streamed(pool: RecognizerPool, key: str, samples: npt.NDArray[np.int16], lm: KeyedLm | None) -> str:
    pool.run([AsrStep(key, "begin", lm=lm)])
    pool.run([AsrStep(key, "feed", samples[start:start + 1600]) for start in range(0, len(samples), 1600)])
    (answer,) = pool.run([AsrStep(key, "end")])
    return cast(Transcript, answer).text


def test_decoder_processes_get_each_version_once_and_hold_a_bounded_number(
        shipped_lm: DomainLm, tenant_models: dict[str, KeyedLm], spoken: list[npt.NDArray[np.int16]]) -> None:
    a, b = tenant_models[TENANT_A], tenant_models[TENANT_B]
    pool = RecognizerPool(shipped_lm, processes=1, max_lms=1)
    try:
        def whole(lm: KeyedLm | None) -> list[str]:
            return [cast(Transcript, answer).text for answer in pool.run([AsrRequest(s, 8000, lm) for s in spoken])]

        texts_a = whole(a)
        assert heard(texts_a), texts_a
        assert pool.shipped == 1 and pool.held(0) == [a.key]  # two utterances, shipped once
        texts_b, texts_shipped = whole(b), whole(None)
        assert not heard(texts_b + texts_shipped), (texts_b, texts_shipped)
        assert pool.shipped == 2 and pool.held(0) == [b.key]  # max_lms=1: a was dropped there
        streamed = [decode_streamed(pool, f"CA-{n}/customer/1", s, a) for n, s in enumerate(spoken)]
        assert heard(streamed), streamed
        assert pool.shipped == 3 and pool.held(0) == [a.key]  # back once, then held
        pool._held[0][b.key] = None  # the pool believes the process holds b, which it dropped
        (lost,) = pool.run([AsrRequest(spoken[0], 8000, b)])
        assert isinstance(lost, LmNotHeld) and b.key not in pool.held(0)  # that utterance fails alone...
        assert not heard([cast(Transcript, answer).text for answer in pool.run([AsrRequest(spoken[0], 8000, b)])])
        assert pool.shipped == 4  # ...and the next one ships it again
    finally:
        pool.close()


# --- through the pipeline and the runtime -----------------------------------------------------------------

@pytest.fixture
def stack_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    stack = sqlite_stack_at(tmp_path)
    migrate(stack.database_url)
    apply_stack_in_process(stack, monkeypatch)
    yield


class NeutralAnalyzers:
    """Speech-to-text through the runtime, emotion fixed (not under test here)."""

    def __init__(self, asr: RuntimeAnalyzers) -> None:
        self.asr = asr
        self.transcribe = asr.transcribe

    async def emotion(self, samples: npt.NDArray[np.int16] | None, sample_rate: int,
                      text: str | None) -> EmotionReading:
        return EmotionReading("neutral", {label: float(label == "neutral") for label in EMOTIONS}, ("audio",))


async def play_call(services: AssistServices, tenant_id: str, call_id: str,
                    utterances: list[npt.NDArray[np.int16]]) -> list[str]:
    """A call of the customer saying ``utterances`` with a second of silence after each; its transcripts."""
    transcripts: list[str] = []

    async def sent_back(track: str, text: str, start_s: float, duration_s: float) -> None:
        transcripts.append(text)

    pipeline = CallPipeline(services, send_transcript=sent_back)
    await pipeline.handle(CallStarted("vonage", call_id, tenant_id, f"stream-{call_id}",
                                      (TrackFormat("customer", "inbound", "l16", 8000),), (Participant("customer"),)))
    silence = np.zeros(8000, np.int16)
    audio = np.concatenate([silence[:4000], *(np.concatenate([s, silence]) for s in utterances)])
    for start in range(0, len(audio), 160):
        await pipeline.handle(AudioChunk("customer", 0, 8000, audio[start:start + 160], start))
    await pipeline.handle(CallEnded("completed"))
    await pipeline.close()
    return transcripts


def test_a_tenants_calls_are_decoded_with_its_own_model_and_no_one_elses(
        stack_in_process: None, shipped_lm: DomainLm, spoken: list[npt.NDArray[np.int16]]) -> None:
    from services.customer_service import store
    from shared.db import session_scope
    from shared.feeds import event_feed

    async def scenario() -> dict[str, list[str]]:
        runtime = ModelRuntime()
        sessions = StreamingSessions(runtime)
        await sessions.load(vad_streaming_model(8000))
        await runtime.load(asr_model_spec(ASR_TEST_MODEL, shipped_lm, processes=1))
        models = TenantLanguageModels(debounce_s=0.1)
        knowledge = TenantKnowledge()
        knowledge.on_synced = models.knowledge_synced  # as the app's start wires it
        asr = RuntimeAnalyzers(runtime, models, model_name=ASR_TEST_MODEL)
        services = AssistServices(sessions=sessions, analyzers=NeutralAnalyzers(asr), knowledge_base=knowledge,
                                  feed=event_feed(), asr_step=asr.asr_step, language_model=models.current)
        for tenant_id, articles in ((TENANT_A, ARTICLES_A), (TENANT_B, ARTICLES_B)):
            with session_scope() as session:  # what the API's article routes do: commit, then sync
                for article in articles:
                    store.create_article(session, tenant_id, article)
            await knowledge.sync_knowledge(tenant_id)
        for tenant_id in (TENANT_A, TENANT_B):
            assert await models.settled(tenant_id) is not None
        heard_by = {tenant_id: await play_call(services, tenant_id, f"CA-{tenant_id}", spoken)
                    for tenant_id in (TENANT_A, TENANT_B, "cs-lm-none")}
        await models.close()
        await sessions.close()
        for name in (ASR_TEST_MODEL, vad_model_name(8000)):
            await runtime.unload(name)
        return heard_by

    heard_by = asyncio.run(scenario())
    assert heard(heard_by[TENANT_A]), heard_by
    assert not heard(heard_by[TENANT_B]) and not heard(heard_by["cs-lm-none"]), heard_by


def test_the_builder_process_builds_off_this_process_and_closes_at_once() -> None:
    from concurrent.futures import CancelledError
    from concurrent.futures.process import BrokenProcessPool

    from shared.processes import DedicatedProcess
    from tests.support import alive

    async def scenario() -> None:
        builder = DedicatedProcess()
        pid = await builder.run(os.getpid)
        assert pid != os.getpid()
        busy = asyncio.ensure_future(builder.run(time.sleep, 60))
        await asyncio.sleep(0.3)
        started = time.perf_counter()
        await builder.close()  # a build under way is abandoned, not waited for
        assert time.perf_counter() - started < 10
        assert not alive(pid)
        with pytest.raises((BrokenProcessPool, CancelledError)):
            await busy

    asyncio.run(scenario())
