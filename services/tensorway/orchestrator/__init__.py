"""The orchestrator: beside a pool of Tritons, it serves `tensorway.inference.v1.InferenceService`
to routers over persistent ModelStreamInfer streams, validates tensors against each model's
signature before Triton sees them, and loads and unloads models as the pool's deployments say.

`tensorway serve orchestrator` runs it from `Settings`; `create` builds it for tests and tools.
"""

from tensorway.orchestrator.core import Orchestrator
from tensorway.orchestrator.models import DeploymentSource, ModelCatalog, ModelPlacement
from tensorway.orchestrator.service import Settings, create

__all__ = [
    "DeploymentSource",
    "ModelCatalog",
    "ModelPlacement",
    "Orchestrator",
    "Settings",
    "create",
]
