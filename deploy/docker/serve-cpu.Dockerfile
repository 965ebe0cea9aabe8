# valley-serve on the CPU: onnxruntime's CPU build (not the GPU one), no torch. From the repository root:
#   docker build -f deploy/docker/serve-cpu.Dockerfile -t valley-serve:cpu .
# Health is left to Kubernetes (gRPC probes on grpc.health.v1): the image declares no health check.

FROM python:3.11.11-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY artefact artefact
COPY service service
COPY training training
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/valley/bin:$PATH \
    VALLEY_REPOSITORY=/models \
    VALLEY_HOST=0.0.0.0
COPY deploy/docker/constraints-serve.txt deploy/docker/requirements-serve-cpu.txt /tmp/
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    python -m venv /opt/valley \
    && /opt/valley/bin/pip install --no-cache-dir -c /tmp/constraints-serve.txt -r /tmp/requirements-serve-cpu.txt \
    && /opt/valley/bin/pip install --no-cache-dir --no-deps --find-links /wheels "valley-ensembles==0.1.0" \
    && rm /tmp/constraints-serve.txt /tmp/requirements-serve-cpu.txt \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin valley
USER 10001:10001
EXPOSE 8000 8001 8002
# Every address of the container: valley-serve then needs --tokens-file (or VALLEY_TOKENS_FILE), or
# VALLEY_INSECURE=true to accept plain access for everyone (docs/serving.md, "Security").
ENTRYPOINT ["valley-serve"]
