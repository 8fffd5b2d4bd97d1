"""`dev up` as a whole: the stack, with the demo models registered while its last components start."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from tensorway.devstack._demo import register_demo_models
from tensorway.devstack._stack import Stack
from tensorway.devstack._state import ComponentRecord, StackState


def up_with_demo_models(
    stack: Stack,
    components: Iterable[str] | None = None,
    *,
    on_started: Callable[[str, ComponentRecord], None] | None = None,
) -> tuple[StackState, list[str]]:
    """Start `components` (see `Stack.up`) and register the demo models (`register_demo_models`).

    The registration begins as soon as the registry and the orchestrator answer, not after the
    last component: the orchestrator fetches, loads and warms the models (the longest part of a
    start) while the router, the batch worker and Envoy are still starting. Returns the stack and
    the demo models, ready on the pool; none when the stack has no registry or orchestrator.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="demo-models") as background:
        registration: Future[list[str]] | None = None

        def answered(name: str, record: ComponentRecord) -> None:
            nonlocal registration
            if on_started is not None:
                on_started(name, record)
            if registration is None:
                # The state file records every component that answered so far, this call's or not.
                so_far = stack.status()
                if _can_register(so_far):
                    registration = background.submit(register_demo_models, so_far)

        state = stack.up(components, on_started=answered)
        if registration is None and _can_register(state):
            registration = background.submit(register_demo_models, state)
        return state, [] if registration is None else registration.result()


def _can_register(state: StackState) -> bool:
    return {"registry", "orchestrator"} <= state.addresses().keys()
