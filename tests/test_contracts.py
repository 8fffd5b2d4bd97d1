"""The contracts: gen/ is what protos/ generate, stubs/ what tritonclient's descriptors
generate, and buf lint (STANDARD) is clean."""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorway import protogen

ROOT = protogen.project_root()


def test_generated_files_match_their_sources() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch)
        protogen.generate_all(ROOT, fresh)
        assert protogen.differences(fresh, ROOT) == [], "gen/ or stubs/ is stale: run `make gen`"


def test_buf_lint_is_clean() -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent))
    assert buf is not None, "buf comes with the local extra"
    protogen.stage_third_party_protos(ROOT)
    result = subprocess.run([buf, "lint"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unary_and_server_streaming_rpcs_are_http_mapped_and_client_streaming_rpcs_are_not() -> None:
    from google.api import annotations_pb2

    from tensorway.batch.v1 import batch_service_pb2
    from tensorway.inference.v1 import inference_service_pb2
    from tensorway.registry.v1 import registry_service_pb2

    for module in (inference_service_pb2, registry_service_pb2, batch_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                mapped = method.GetOptions().HasExtension(annotations_pb2.http)
                # Envoy's transcoder streams a server stream's answers to REST clients; a client
                # stream has no REST form. Server streams are mapped only where REST needs them.
                if method.client_streaming:
                    assert not mapped, f"{service.full_name}/{method.name}"
                elif not method.server_streaming:
                    assert mapped, f"{service.full_name}/{method.name}"
