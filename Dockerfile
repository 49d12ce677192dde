# mcp-authz container image.
#   docker build -t mcp-authz:dev .
# Build stage: install the package and its runtime dependencies (no dev extra) into a venv.
# Runtime stage: the same slim Python base, that venv, a non-root user; no pip, no build tools.
# The generated protobuf/gRPC code is committed under authz/pb and installed with the package
# (tests/test_build.py checks it matches proto/); the build fails if it does not import.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY authz ./authz
RUN /opt/venv/bin/pip install . \
 && /opt/venv/bin/pip uninstall --yes pip setuptools \
 && /opt/venv/bin/python -c "import authz.pb.external_auth_pb2_grpc, authz.cli"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 mcp-authz \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin mcp-authz
COPY --from=build /opt/venv /opt/venv
# Bytecode was compiled at install time; the root filesystem is read-only in Kubernetes.
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# 9001 ext_authz gRPC + gRPC health; 9002 HTTP /healthz, /readyz, /metrics.
EXPOSE 9001 9002
ENTRYPOINT ["mcp-authz"]
CMD ["--help"]
