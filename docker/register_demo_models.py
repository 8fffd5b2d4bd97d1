"""Register the demo models in the compose stack's registry, as `tensorway dev up` does locally.

Pool `pools/local` is created with no endpoints (orchestrators join it themselves, with a
lease), and the demo models get version 1 in PRODUCTION with all traffic; their signatures are
read from the orchestrator, so they are what Triton actually serves. Safe to run again.

    python register_demo_models.py REGISTRY_ADDRESS ORCHESTRATOR_ADDRESS
"""

from __future__ import annotations

import sys

from tensorway.devstack import ComponentRecord, Endpoint, StackState, register_demo_models


def stack(registry: str, orchestrator: str) -> StackState:
    """The compose stack's addresses in the shape register_demo_models reads."""

    def record(name: str, address: str) -> ComponentRecord:
        # Not a process this script started: nothing to identify or stop.
        return ComponentRecord(pid=0, start_ticks=0, log="", endpoints={name: Endpoint(address=address)})

    return StackState(
        components={
            "registry": record("registry", registry),
            "orchestrator": record("orchestrator", orchestrator),
        }
    )


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    models = register_demo_models(stack(argv[1], argv[2]), timeout=30.0)
    print(f"registered {', '.join(models)} on pools/local")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
