"""Which models the pool serves: their cached signatures, and placing them on the Tritons
(explicit model control) as the pool's deployments say: fetching their artifacts, loading,
warming and unloading them, and reporting each version's state on each Triton."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import grpc

from tensorway.common.v1 import error_pb2
from tensorway.orchestrator.artifacts import ArtifactError, ModelRepository, is_fetched
from tensorway.orchestrator.declared import signature_mismatch
from tensorway.orchestrator.pool import TritonEndpoint, TritonPool
from tensorway.orchestrator.triton_errors import ModelGone
from tensorway.orchestrator.warmup import warmed_by_triton, warmup_request
from tensorway.runtime import NotFound, TensorwayError, Unavailable
from tensorway.tensors.signatures import ModelSignature

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


class DeployedModels(frozenset[str]):
    """The models the pool should serve, as a set of names, with the versions of each that the
    registry routes to the pool and their artifact URIs ("" for a model already in the Tritons'
    repository). A plain set of names (a source that knows no versions) loads models by name."""

    versions: Mapping[str, Mapping[str, str]]
    signatures: Mapping[tuple[str, str], ModelSignature]
    """(model, version) → the signature the registry declares, checked once Triton loads it."""

    def __new__(
        cls,
        versions: Mapping[str, Mapping[str, str]],
        signatures: Mapping[tuple[str, str], ModelSignature] | None = None,
    ) -> DeployedModels:
        deployed = super().__new__(cls, versions.keys())
        deployed.versions = versions
        deployed.signatures = signatures or {}
        return deployed


class DeploymentSource(Protocol):
    """Where the orchestrator learns which models its pool should serve (the registry, or a fake)."""

    def watch(self) -> AsyncIterator[frozenset[str]]:
        """Each item is the complete set of models the pool should serve from now on; a
        `DeployedModels` names their versions too."""
        ...


class VersionState(enum.Enum):
    """Where one model version stands on one Triton."""

    LOADING = "LOADING"
    WARMING = "WARMING"
    READY = "READY"
    FAILED = "FAILED"


@dataclass(frozen=True)
class VersionStatus:
    """A version's state on one Triton, and why it is not ready."""

    state: VersionState
    reason: str = ""


@dataclass(frozen=True)
class StateLine:
    """One line of a state report: a model version's state on one Triton."""

    model: str
    version: str
    triton: str
    state: VersionState
    reason: str


class StateReporter(Protocol):
    """Where the versions' states go (the registry, or a fake)."""

    async def report(self, lines: Sequence[StateLine]) -> None:
        """Replace what this orchestrator reported before by `lines`."""
        ...


# (Triton address, model, version)
_VersionKey = tuple[str, str, str]


class ModelPlacement:
    """Places models on every Triton of the pool and reports each version's state.

    `initial_models` are loaded at start and kept. When a deployment source is given, its sets are
    the truth: their models are loaded, and models neither in the latest set nor initial are
    unloaded. A Triton that comes back (restarted, so empty) gets the wanted models again.

    A deployed version with an `s3://` artifact is fetched into `repository` first; the model's
    config then loads exactly its deployed versions that have not failed. A version counts as
    READY on a Triton only once it is loaded and has answered its warm-up request; one that
    cannot be fetched, loaded or warmed is FAILED with the reason (Triton's own for a load), and
    is not tried again until its artifact changes. Versions that still load keep serving: Triton
    swaps a model's versions only once the new ones are loaded.
    """

    def __init__(
        self,
        pool: TritonPool,
        catalog: ModelCatalog,
        initial_models: Sequence[str],
        source: DeploymentSource | None,
        *,
        repository: ModelRepository | Mapping[str, ModelRepository] | None = None,
        reporter: StateReporter | None = None,
        warmup_timeout: timedelta = timedelta(seconds=30),
        report_retry: timedelta = timedelta(seconds=1),
        load_concurrency: int = 4,
    ) -> None:
        """`load_concurrency` bounds the models being fetched, loaded and warmed at once (Triton's
        own default for the models it loads at start is 4 threads)."""
        self._pool = pool
        self._catalog = catalog
        self._initial = frozenset(initial_models)
        self._deployed: frozenset[str] | None = None
        self._versions: Mapping[str, Mapping[str, str]] = {}
        self._signatures: Mapping[tuple[str, str], ModelSignature] = {}
        self._source = source
        # One repository for every Triton, or one per Triton address.
        self._repositories: Mapping[str, ModelRepository] = (
            {endpoint.address: repository for endpoint in pool.endpoints}
            if isinstance(repository, ModelRepository)
            else dict(repository or {})
        )
        self._reporter = reporter
        self._warmup_timeout = warmup_timeout.total_seconds()
        self._report_retry = report_retry.total_seconds()
        self._applying = asyncio.Lock()
        self._loading = asyncio.Semaphore(load_concurrency)
        self._latest: frozenset[str] = frozenset()
        """The deployment source's latest set, not placed yet when `_arrived` is set."""
        self._arrived = asyncio.Event()
        self._replacing: set[asyncio.Task[None]] = set()
        self.states: dict[_VersionKey, VersionStatus] = {}
        """Each deployed version's state on each Triton."""
        self._placed: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
        self._failed_artifacts: dict[tuple[str, str, str], str] = {}
        self._report_due = asyncio.Event()
        self.reported = asyncio.Condition()
        """Notified after every report the reporter took."""
        pool.add_listener(self._on_readiness)

    @property
    def wanted(self) -> frozenset[str]:
        return self._initial | (self._deployed or frozenset())

    def report_to(self, reporter: StateReporter) -> None:
        """Report the versions' states to `reporter` from `run()` on."""
        self._reporter = reporter

    def report_again(self) -> None:
        """Report the states again though none changed: the registry dropped the last report
        with a membership whose lease ran out."""
        self._report_due.set()

    async def run(self) -> None:
        """Place the initial models, then follow the deployment source until cancelled.

        The source is read while models load: sets that arrive meanwhile are placed together
        once the current placement ends, from the latest of them, so deployments created one
        after another load side by side rather than in line."""
        async with asyncio.TaskGroup() as group:
            if self._reporter is not None:
                group.create_task(self._report_loop())
            if self._source is not None:
                group.create_task(self._follow(self._source))
            await self.apply(self._pool.endpoints)
            if self._source is None:
                return
            while True:
                await self._arrived.wait()
                self._arrived.clear()
                deployed = self._latest
                versions = deployed.versions if isinstance(deployed, DeployedModels) else {}
                signatures = deployed.signatures if isinstance(deployed, DeployedModels) else {}
                if (frozenset(deployed), versions, signatures) == (
                    self._deployed,
                    self._versions,
                    self._signatures,
                ):
                    continue  # the routes changed elsewhere (weights, readiness), not what is placed
                logger.info("deployments for the pool: %s", ", ".join(sorted(deployed)) or "none")
                self._deployed = frozenset(deployed)
                self._versions = versions
                self._signatures = signatures
                await self.apply(self._pool.endpoints)

    async def _follow(self, source: DeploymentSource) -> None:
        async for deployed in source.watch():
            self._latest = deployed
            self._arrived.set()

    async def apply(self, endpoints: Sequence[TritonEndpoint]) -> None:
        """Make the given Tritons serve the wanted models, then report the new readiness.

        Models are placed side by side, up to `load_concurrency` at a time, since a load is
        mostly Triton starting the model's instances; each model visits the Tritons in turn, so
        Tritons that share a repository never fetch the same model at once."""
        async with self._applying:
            wanted = self.wanted
            await asyncio.gather(*(endpoint.refresh() for endpoint in endpoints))
            reachable = []
            for endpoint in endpoints:
                if endpoint.ready:
                    reachable.append(endpoint)
                else:
                    self._mark_lost(endpoint, "the Triton is not reachable")
            ready = {endpoint.address: endpoint.ready_models or frozenset() for endpoint in reachable}
            changed: set[str] = set()

            async def place_everywhere(model: str) -> None:
                async with self._loading:
                    for endpoint in reachable:
                        if await self._place(endpoint, model, ready[endpoint.address]):
                            changed.add(model)

            async with asyncio.TaskGroup() as group:
                for model in sorted(wanted):
                    group.create_task(place_everywhere(model))
            if self._deployed is not None:
                for endpoint in reachable:
                    changed |= await self._unload(endpoint, ready[endpoint.address] - wanted)
            self._forget_undeployed()
            if self._deployed is not None:
                for repository in {id(r): r for r in self._repositories.values()}.values():
                    for model in changed - wanted:
                        await repository.remove(model)
            self._catalog.forget(changed)
            await self._pool.refresh(endpoints)
            self._report_due.set()

    def report_lines(self) -> list[StateLine]:
        """The states of every deployed version on every Triton, as the registry gets them."""
        return [
            StateLine(model, version, triton, status.state, status.reason)
            for (triton, model, version), status in sorted(self.states.items())
        ]

    async def _place(self, endpoint: TritonEndpoint, model: str, ready: frozenset[str]) -> bool:
        """Bring `model` on this Triton to its deployed versions; True when Triton was asked to
        load it."""
        versions = dict(self._versions.get(model, {}))
        desired = tuple(sorted(versions.items()))
        key = (endpoint.address, model)
        if not versions and key not in self._placed and model in ready:
            # Wanted by name and already served (Triton loaded it at its start, or an orchestrator
            # before this one did): loading it again would only restart its instances.
            self._placed[key] = desired
            return False
        failed = all(self._status(endpoint, model, v) is VersionState.FAILED for v in versions)
        if self._placed.get(key) == desired and (model in ready or (versions and failed)):
            return False  # placed already, or nothing of it can load until its artifacts change
        loadable = await self._fetch(endpoint, model, versions)
        fetched = [version for version, uri in loadable.items() if is_fetched(uri)]
        if any(is_fetched(uri) for uri in versions.values()) and not fetched:
            self._placed[key] = desired  # every artifact failed: nothing to load until one changes
            return False
        repository = self._repositories.get(endpoint.address)
        if fetched and repository is not None:
            await repository.write_config(model, fetched)
        for version in loadable:
            if self._status(endpoint, model, version) is not VersionState.READY:
                self._set(endpoint, model, version, VersionState.LOADING, "Triton is loading it")
        loaded = await self._load(endpoint, model, loadable, fetched)
        if repository is not None:
            # Versions no deployment routes here any more leave the repository once Triton has
            # loaded the model without them.
            for version in repository.fetched_versions(model):
                if version not in versions:
                    await repository.remove_version(model, version)
        for version in loaded:
            if self._status(endpoint, model, version) is not VersionState.READY:
                await self._warm(endpoint, model, version)
        self._placed[key] = desired
        return True

    async def _fetch(
        self, endpoint: TritonEndpoint, model: str, versions: Mapping[str, str]
    ) -> dict[str, str]:
        """Fetch the versions' artifacts; the versions that may be loaded."""
        loadable = dict(versions)
        for version, uri in versions.items():
            if not is_fetched(uri):
                continue
            failure = self._failed_artifacts.get((model, version, uri))
            repository = self._repositories.get(endpoint.address)
            if failure is None and repository is None:
                failure = f"the orchestrator has no model repository for Triton {endpoint.address}"
            elif failure is None and repository is not None:
                if self._status(endpoint, model, version) is not VersionState.READY:
                    self._set(endpoint, model, version, VersionState.LOADING, f"fetching {uri}")
                try:
                    await repository.fetch(model, version, uri)
                    repository.config_of(model, version)
                except ArtifactError as error:
                    failure = self._failed_artifacts[model, version, uri] = str(error)
                    await repository.remove_version(model, version)
            if failure is not None:
                logger.error("model %s version %s cannot be served: %s", model, version, failure)
                self._set(endpoint, model, version, VersionState.FAILED, failure)
                del loadable[version]
        return loadable

    async def _load(
        self, endpoint: TritonEndpoint, model: str, loadable: Mapping[str, str], fetched: list[str]
    ) -> list[str]:
        """Load the model on the Triton; the versions of `loadable` it then has ready. A version
        Triton fails is FAILED with Triton's reason, and the others are loaded without it."""
        try:
            await endpoint.load(model)
        except TensorwayError as error:
            logger.error("cannot load model %s on Triton %s: %s", model, endpoint.address, error)
            load_error = str(error)
        else:
            logger.info("loaded model %s on Triton %s", model, endpoint.address)
            load_error = ""
        states = await self._triton_states(endpoint, model)
        loaded: list[str] = []
        for version, uri in loadable.items():
            state, reason = states.get(version, ("", ""))
            if state == "READY":
                loaded.append(version)
                continue
            reason = reason or load_error or f"Triton has no version {version} of model {model!r}"
            self._set(endpoint, model, version, VersionState.FAILED, reason)
            if is_fetched(uri):
                self._failed_artifacts[model, version, uri] = reason
        remaining = [version for version in fetched if version in loaded]
        repository = self._repositories.get(endpoint.address)
        if load_error and remaining and len(remaining) < len(fetched) and repository is not None:
            # Without the failed versions, so that a Triton that restarts loads the others.
            await repository.write_config(model, remaining)
            try:
                await endpoint.load(model)
            except TensorwayError as error:
                logger.error("cannot reload model %s on Triton %s: %s", model, endpoint.address, error)
        return loaded

    async def _triton_states(self, endpoint: TritonEndpoint, model: str) -> dict[str, tuple[str, str]]:
        """Each version of `model` Triton knows: its state and reason."""
        try:
            index = await endpoint.repository_index()
        except grpc.aio.AioRpcError as error:
            return {"": ("", error.details() or error.code().name)}
        return {entry.version: (entry.state, entry.reason) for entry in index.models if entry.name == model}

    async def _warm(self, endpoint: TritonEndpoint, model: str, version: str) -> None:
        self._set(endpoint, model, version, VersionState.WARMING, "answering its warm-up request")
        try:
            config = (await endpoint.model_config(model, version)).config
            mismatch = signature_mismatch(self._signatures.get((model, version)), config)
            if mismatch is not None:
                logger.error("model %s version %s: %s", model, version, mismatch)
                self._set(endpoint, model, version, VersionState.FAILED, mismatch)
                return
            if not warmed_by_triton(config):
                request = warmup_request(model, version, config)
                await asyncio.wait_for(endpoint.infer(request), self._warmup_timeout)
        except (TensorwayError, grpc.aio.AioRpcError, TimeoutError) as error:
            reason = f"its warm-up request failed: {getattr(error, 'details', lambda: None)() or error}"
            logger.error("model %s version %s on Triton %s: %s", model, version, endpoint.address, reason)
            self._set(endpoint, model, version, VersionState.FAILED, reason)
            return
        logger.info("model %s version %s is ready on Triton %s", model, version, endpoint.address)
        self._set(endpoint, model, version, VersionState.READY)

    async def _unload(self, endpoint: TritonEndpoint, models: Iterable[str]) -> set[str]:
        done: set[str] = set()
        for model in sorted(models):
            try:
                await endpoint.unload(model)
            except TensorwayError as error:
                logger.error("cannot unload model %s on Triton %s: %s", model, endpoint.address, error)
            else:
                logger.info("unloaded model %s on Triton %s", model, endpoint.address)
                self._placed.pop((endpoint.address, model), None)
                done.add(model)
        return done

    def _forget_undeployed(self) -> None:
        for key in list(self.states):
            _, model, version = key
            if version not in self._versions.get(model, {}):
                del self.states[key]
                self._report_due.set()

    def _status(self, endpoint: TritonEndpoint, model: str, version: str) -> VersionState | None:
        status = self.states.get((endpoint.address, model, version))
        return None if status is None else status.state

    def _set(
        self, endpoint: TritonEndpoint, model: str, version: str, state: VersionState, reason: str = ""
    ) -> None:
        status = VersionStatus(state, reason)
        if self.states.get((endpoint.address, model, version)) != status:
            self.states[endpoint.address, model, version] = status
            self._report_due.set()

    def _mark_lost(self, endpoint: TritonEndpoint, reason: str, models: Iterable[str] | None = None) -> None:
        """The Triton lost its models (all, or `models`): they are loading again once it is back."""
        lost = None if models is None else set(models)
        for (triton, model, version), status in list(self.states.items()):
            if triton != endpoint.address or (lost is not None and model not in lost):
                continue
            if status.state in (VersionState.READY, VersionState.WARMING):
                self._set(endpoint, model, version, VersionState.LOADING, reason)
        for triton, model in list(self._placed):
            if triton == endpoint.address and (lost is None or model in lost):
                del self._placed[triton, model]

    async def _on_readiness(self, readiness: Mapping[str, bool], came_up: Sequence[TritonEndpoint]) -> None:
        again = list(came_up)
        for endpoint in self._pool.endpoints:
            if not endpoint.ready:
                self._mark_lost(endpoint, "the Triton is not reachable")
                continue
            gone = {
                model
                for (triton, model, _), status in self.states.items()
                if triton == endpoint.address
                and status.state is VersionState.READY
                and endpoint.ready_models is not None
                and model not in endpoint.ready_models
            }
            if gone:
                self._mark_lost(endpoint, "the Triton no longer has it loaded", gone)
                if endpoint not in again:
                    again.append(endpoint)
        if again and self.wanted:
            # Not awaited: apply() refreshes the pool, which is in the middle of telling its listeners.
            task = asyncio.ensure_future(self.apply(again))
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)

    async def _report_loop(self) -> None:
        assert self._reporter is not None
        while True:
            await self._report_due.wait()
            self._report_due.clear()
            try:
                await self._reporter.report(self.report_lines())
            except (grpc.aio.AioRpcError, TensorwayError, OSError) as error:
                logger.warning("cannot report model states: %s", error)
                await asyncio.sleep(self._report_retry)
                self._report_due.set()
                continue
            async with self.reported:
                self.reported.notify_all()

    async def close(self) -> None:
        """Stop placing models on Tritons that came back."""
        for task in self._replacing:
            task.cancel()
        await asyncio.gather(*self._replacing, return_exceptions=True)
