"""Which models the pool serves: their cached signatures, and loading and unloading them on the
Tritons (explicit model control) as the pool's deployments say."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Protocol

from tensorway.common.v1 import error_pb2
from tensorway.orchestrator.pool import TritonEndpoint, TritonPool
from tensorway.orchestrator.signatures import ModelSignature
from tensorway.orchestrator.triton_errors import ModelGone
from tensorway.runtime import NotFound, TensorwayError, Unavailable

logger = logging.getLogger(__name__)


class ModelCatalog:
    """Each model version's signature, fetched from Triton once and kept until the model changes.

    Concurrent first requests for one model share one fetch. A model whose readiness changes
    (loaded, unloaded, reloaded by anyone) is fetched again, since its signature may have changed.
    """

    def __init__(self, pool: TritonPool) -> None:
        self._pool = pool
        self._signatures: dict[tuple[str, str], asyncio.Future[ModelSignature]] = {}
        self._readiness: Mapping[str, bool] = {}
        pool.add_listener(self._on_readiness)

    async def signature(self, model: str, version: str) -> ModelSignature:
        """The signature of `model` at `version` ("" for Triton's default).

        Raises NotFound (MODEL_NOT_FOUND) for a model or version Triton does not know, and
        Unavailable (MODEL_NOT_READY) for one it knows but has not loaded.
        """
        key = (model, version)
        cached = self._signatures.get(key)
        if cached is None:
            cached = asyncio.ensure_future(self._fetch(model, version))
            self._signatures[key] = cached
            # A failure is not cached: the model may be loaded a moment later.
            cached.add_done_callback(lambda done: self._drop_failed(key, done))
        return await asyncio.shield(cached)

    def forget(self, models: Iterable[str]) -> None:
        """Drop the cached signatures of `models`: they were loaded, unloaded or reloaded."""
        names = set(models)
        for key in [key for key in self._signatures if key[0] in names]:
            del self._signatures[key]

    async def _on_readiness(self, readiness: Mapping[str, bool], _came_up: Sequence[TritonEndpoint]) -> None:
        # A model without an earlier report was ready when its signature was fetched.
        self.forget(model for model, ready in readiness.items() if self._readiness.get(model, True) != ready)
        self._readiness = dict(readiness)

    def _drop_failed(self, key: tuple[str, str], done: asyncio.Future[ModelSignature]) -> None:
        if (done.cancelled() or done.exception() is not None) and self._signatures.get(key) is done:
            del self._signatures[key]

    async def _fetch(self, model: str, version: str) -> ModelSignature:
        endpoint = self._pool.choose(model)
        try:
            metadata, config = await endpoint.signature_sources(model, version)
        except ModelGone as gone:
            # Triton says NOT_FOUND both for a model it has never heard of and for one it has
            # not loaded; its repository index tells them apart.
            if model in await endpoint.known_models():
                if version:
                    raise NotFound(
                        "model version", f"{model}/{version}", reason=error_pb2.ERROR_REASON_MODEL_NOT_FOUND
                    ) from gone
                raise Unavailable(
                    f"model {model!r} is not loaded", reason=error_pb2.ERROR_REASON_MODEL_NOT_READY
                ) from gone
            raise NotFound("model", model, reason=error_pb2.ERROR_REASON_MODEL_NOT_FOUND) from gone
        return ModelSignature.from_triton(metadata, config)


class DeploymentSource(Protocol):
    """Where the orchestrator learns which models its pool should serve (the registry, or a fake)."""

    def watch(self) -> AsyncIterator[frozenset[str]]:
        """Each item is the complete set of models the pool should serve from now on."""
        ...


class ModelPlacement:
    """Loads and unloads models on every Triton of the pool.

    `initial_models` are loaded at start and kept. When a deployment source is given, its sets are
    the truth: their models are loaded, and models neither in the latest set nor initial are
    unloaded. A Triton that comes back (restarted, so empty) gets the wanted models again.
    """

    def __init__(
        self,
        pool: TritonPool,
        catalog: ModelCatalog,
        initial_models: Sequence[str],
        source: DeploymentSource | None,
    ) -> None:
        self._pool = pool
        self._catalog = catalog
        self._initial = frozenset(initial_models)
        self._deployed: frozenset[str] | None = None
        self._source = source
        self._applying = asyncio.Lock()
        self._replacing: set[asyncio.Task[None]] = set()
        pool.add_listener(self._on_readiness)

    @property
    def wanted(self) -> frozenset[str]:
        return self._initial | (self._deployed or frozenset())

    async def run(self) -> None:
        """Place the initial models, then follow the deployment source until cancelled."""
        await self.apply(self._pool.endpoints)
        if self._source is None:
            return
        async for deployed in self._source.watch():
            logger.info("deployments for the pool: %s", ", ".join(sorted(deployed)) or "none")
            self._deployed = deployed
            await self.apply(self._pool.endpoints)

    async def apply(self, endpoints: Sequence[TritonEndpoint]) -> None:
        """Make the given Tritons serve the wanted models, then report the new readiness."""
        async with self._applying:
            wanted = self.wanted
            await asyncio.gather(*(endpoint.refresh() for endpoint in endpoints))
            changed: set[str] = set()
            for endpoint in endpoints:
                if not endpoint.ready:
                    continue
                ready = endpoint.ready_models or frozenset()
                removable = ready - wanted if self._deployed is not None else frozenset()
                changed |= await self._place(endpoint, wanted - ready, removable)
            self._catalog.forget(changed)
            await self._pool.refresh(endpoints)

    async def _place(
        self, endpoint: TritonEndpoint, to_load: Iterable[str], to_unload: Iterable[str]
    ) -> set[str]:
        done: set[str] = set()
        for model, action in [*((m, "load") for m in to_load), *((m, "unload") for m in to_unload)]:
            try:
                if action == "load":
                    await endpoint.load(model)
                else:
                    await endpoint.unload(model)
            except TensorwayError as error:
                logger.error("cannot %s model %s on Triton %s: %s", action, model, endpoint.address, error)
            else:
                logger.info("%sed model %s on Triton %s", action, model, endpoint.address)
                done.add(model)
        return done

    async def _on_readiness(self, readiness: Mapping[str, bool], came_up: Sequence[TritonEndpoint]) -> None:
        if came_up and self.wanted:
            # Not awaited: apply() refreshes the pool, which is in the middle of telling its listeners.
            task = asyncio.ensure_future(self.apply(came_up))
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)

    async def close(self) -> None:
        """Stop placing models on Tritons that came back."""
        for task in self._replacing:
            task.cancel()
        await asyncio.gather(*self._replacing, return_exceptions=True)
