# The awslabs HealthImaging MCP server as a container (there is no official image).
#   docker build -t healthimaging-mcp-server:dev -f k8s/healthimaging-mcp-server.Dockerfile k8s
# The Deployment sets the command: the server's MCPServer app over streamable HTTP on
# 127.0.0.1:8000 (its console script only speaks stdio). The version is pinned; bump it here
# and in k8s/istio/central-servers' `images:` tag together.
ARG PYTHON_IMAGE=python:3.12-slim
ARG HEALTHIMAGING_MCP_SERVER_VERSION=0.1.1

FROM ${PYTHON_IMAGE} AS build
ARG HEALTHIMAGING_MCP_SERVER_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install "awslabs-healthimaging-mcp-server==${HEALTHIMAGING_MCP_SERVER_VERSION}" \
 && /opt/venv/bin/pip uninstall --yes pip \
 && /opt/venv/bin/python -c "from awslabs.healthimaging_mcp_server.server import app"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 mcp \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
      --shell /usr/sbin/nologin mcp
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
USER 10001:10001
CMD ["python", "-c", "from awslabs.healthimaging_mcp_server.server import app; app.run(transport='streamable-http', host='127.0.0.1', port=8000)"]
