"""Per-tenant domain language models: a tenant's calls are decoded with a trigram built from the
shipped call scripts and that tenant's own knowledge base (article titles, bodies and replies).

The knowledge base reaches a process's index one way (:class:`~.pipeline.TenantKnowledge`: the
API's own change, else the sync at a call's start or an upload catches up with other replicas);
after each sync :meth:`TenantLanguageModels.knowledge_synced` compares the tenant's articles with
those its model was built from, and when they differ builds the model again in a thread. A burst of
edits makes one build: the first model of a tenant is built at once, later ones ``debounce_s``
after the change that asked for them (edits meanwhile are in it), and a change during a build
starts another after it.

A model is known by its key, the tenant and a digest of the articles (:class:`~.asr.KeyedLm`), so
the decoder processes get each version once. Until a tenant's model is built (the first seconds of
its first call in a process), and when it has no article, its calls use the shipped domain model.
Built models are kept for ``max_tenants`` tenants, least recently used out; an evicted tenant's
model is built again at its next sync. Tenants are walls: a model holds the shipped scripts and
the one tenant's articles, nothing of any other tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

from services.customer_service.asr import KeyedLm, build_domain_lm, script_texts
from services.customer_service.knowledge import Article, KnowledgeIndex

logger = logging.getLogger("tessera.cs.tenant_lm")

DEBOUNCE_S = 2.0
"""Quiet time after a knowledge-base change before the tenant's model is rebuilt."""
MAX_TENANTS = 64
"""Tenants whose built models a process keeps (an ARPA text and a dictionary: ~0.2 MB each)."""


def article_texts(articles: Sequence[Article]) -> list[str]:
    """What a tenant's model learns from its articles: each title, body and reply."""
    return [text for article in articles for text in (article.title, article.body, article.reply or "")
            if text.strip()]


def knowledge_version(articles: Sequence[Article]) -> str:
    """A digest of what the model is built from (ids and texts; tags and times do not change it)."""
    digest = hashlib.sha256()
    for article in sorted(articles, key=lambda a: a.article_id):
        for part in (article.article_id, article.title, article.body, article.reply or ""):
            digest.update(part.encode())
            digest.update(b"\0")
    return digest.hexdigest()[:16]


def build_tenant_lm(tenant_id: str, articles: Sequence[Article]) -> KeyedLm:
    """The tenant's model: the shipped call scripts and its articles (raises ``ValueError`` when
    there is nothing to build from)."""
    foreign = {article.tenant_id for article in articles} - {tenant_id}
    if foreign:
        raise ValueError(f"articles of another tenant given for tenant {tenant_id!r}")
    return KeyedLm(f"{tenant_id}@{knowledge_version(articles)}",
                   build_domain_lm([*script_texts(), *article_texts(articles)]))


class TenantLanguageModels:
    """The process's per-tenant language models (see the module docstring); used from its event loop."""

    def __init__(self, *, debounce_s: float = DEBOUNCE_S, max_tenants: int = MAX_TENANTS,
                 build: Callable[[str, Sequence[Article]], KeyedLm] = build_tenant_lm) -> None:
        if max_tenants < 1:
            raise ValueError("max_tenants must be >= 1")
        self.debounce_s = debounce_s
        self.max_tenants = max_tenants
        self._build = build
        self._models: OrderedDict[str, KeyedLm] = OrderedDict()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.builds = 0
        """Models built so far (a test and the log count them)."""

    def current(self, tenant_id: str) -> KeyedLm | None:
        """The tenant's model to decode with now (None: the shipped one)."""
        model = self._models.get(tenant_id)
        if model is not None:
            self._models.move_to_end(tenant_id)
        return model

    def tenants(self) -> list[str]:
        """Tenants with a built model, least recently used first."""
        return list(self._models)

    def knowledge_synced(self, tenant_id: str, index: KnowledgeIndex) -> None:
        """The tenant's articles in ``index`` were synced: rebuild its model if they changed."""
        if tenant_id in self._tasks:
            return  # the pending build reads the articles when it starts, and checks again after
        model = self._models.get(tenant_id)
        articles = index.articles(tenant_id)
        if not articles:
            self._models.pop(tenant_id, None)
            return
        if model is not None and model.key == self._key(tenant_id, articles):
            return
        delay = 0.0 if model is None else self.debounce_s
        self._tasks[tenant_id] = asyncio.get_running_loop().create_task(self._rebuild(tenant_id, index, delay))

    async def settled(self, tenant_id: str) -> KeyedLm | None:
        """The tenant's model once any pending build of it is done."""
        while (task := self._tasks.get(tenant_id)) is not None:
            await asyncio.shield(task)
        return self.current(tenant_id)

    async def close(self) -> None:
        """Cancel pending builds."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @staticmethod
    def _key(tenant_id: str, articles: Sequence[Article]) -> str:
        return f"{tenant_id}@{knowledge_version(articles)}"

    async def _rebuild(self, tenant_id: str, index: KnowledgeIndex, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            while True:
                articles = index.articles(tenant_id)
                if not articles:
                    self._models.pop(tenant_id, None)
                    return
                model = self._models.get(tenant_id)
                if model is not None and model.key == self._key(tenant_id, articles):
                    return
                try:
                    built = await asyncio.to_thread(self._build, tenant_id, articles)
                except ValueError as unusable:
                    logger.warning("tenant %s: no domain language model from its knowledge base (%s); "
                                   "its calls use the shipped one", tenant_id, unusable)
                    return
                self._keep(tenant_id, built)
                if self._key(tenant_id, index.articles(tenant_id)) == built.key:
                    return
                await asyncio.sleep(self.debounce_s)  # changed while building: once more, after a pause
        except Exception:
            logger.exception("tenant %s: its domain language model could not be built", tenant_id)
        finally:
            self._tasks.pop(tenant_id, None)

    def _keep(self, tenant_id: str, model: KeyedLm) -> None:
        self.builds += 1
        self._models[tenant_id] = model
        self._models.move_to_end(tenant_id)
        while len(self._models) > self.max_tenants:
            evicted, _ = self._models.popitem(last=False)
            logger.info("tenant %s: its domain language model leaves the cache (built again on use)", evicted)
        logger.info("tenant %s: domain language model %s built (%d words)", tenant_id, model.key,
                    len(model.lm.vocabulary))

