"""The local stack: every server the mesh needs, run from pip packages on loopback.

`up` starts PostgreSQL, Redis, Kafka (Tansu), S3 (SeaweedFS), Triton, the registry, an
orchestrator, the router and Envoy as background processes on free ports and records them
in a state file; `down` stops them; `status` says what runs. `tensorway dev` and the test
fixtures both use it.
"""

from tensorway.devstack._component import Component, LaunchContext, PackageFile, Started
from tensorway.devstack._demo import demo_request, register_demo_models
from tensorway.devstack._envoy import render_envoy_config
from tensorway.devstack._errors import DevStackError
from tensorway.devstack._services import ROUTED_DEMO_MODELS
from tensorway.devstack._settings import DevStackSettings, S3Credentials, ServiceEndpoints
from tensorway.devstack._stack import COMPONENT_NAMES, Stack, default_components, down, status, up
from tensorway.devstack._startup import up_with_demo_models
from tensorway.devstack._state import STATE_FILE_NAME, ComponentRecord, Endpoint, StackState

__all__ = [
    "COMPONENT_NAMES",
    "ROUTED_DEMO_MODELS",
    "STATE_FILE_NAME",
    "Component",
    "ComponentRecord",
    "DevStackError",
    "DevStackSettings",
    "Endpoint",
    "LaunchContext",
    "PackageFile",
    "S3Credentials",
    "ServiceEndpoints",
    "Stack",
    "StackState",
    "Started",
    "default_components",
    "demo_request",
    "down",
    "register_demo_models",
    "render_envoy_config",
    "status",
    "up",
    "up_with_demo_models",
]
