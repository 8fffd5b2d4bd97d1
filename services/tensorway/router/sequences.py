"""Stateful sequences stay on one endpoint for their life.

Triton keeps a sequence's state (sequence batching) in the one Triton that saw its START, so every
later request of the sequence must reach the same orchestrator, which sends it to the same
Triton. A sequence's START picks an endpoint and pins the sequence to it; its END unpins it. A
request of a sequence whose endpoint is gone fails with ABORTED: running it elsewhere would
silently restart the sequence from nothing.
"""

from __future__ import annotations

from collections import OrderedDict

from tensorway.tensors.triton import SequenceStep

SequenceKey = tuple[str, str, str]
"""(model, version, sequence id): Triton's sequence ids are per model."""


class SequencePins:
    """Which endpoint each live sequence runs on.

    Bounded: past `capacity` the least recently used pin is dropped (a client that never sends
    END would otherwise grow it forever); its next request then fails as a sequence whose endpoint
    is unknown would, unless rendezvous picks the same endpoint again.
    """

    def __init__(self, capacity: int = 65536) -> None:
        self._capacity = capacity
        self._pins: OrderedDict[SequenceKey, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pins)

    def get(self, key: SequenceKey) -> str | None:
        address = self._pins.get(key)
        if address is not None:
            self._pins.move_to_end(key)
        return address

    def pin(self, key: SequenceKey, address: str) -> None:
        self._pins[key] = address
        self._pins.move_to_end(key)
        while len(self._pins) > self._capacity:
            self._pins.popitem(last=False)

    def unpin(self, key: SequenceKey) -> None:
        self._pins.pop(key, None)


def key_of(model: str, version: str, step: SequenceStep) -> SequenceKey:
    return (model, version, step.id)
