# valley-serve on an NVIDIA GPU: onnxruntime-gpu on the CUDA 12 / cuDNN 9 runtime, no torch.
#   docker build -f deploy/docker/serve-gpu.Dockerfile -t valley-serve:gpu .
# Run with the NVIDIA container runtime (Kubernetes: a node with the NVIDIA device plugin and an
# nvidia.com/gpu limit). Without a usable GPU the server falls back to the CPU provider and says so.

FROM python:3.11.11-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY artefact artefact
COPY service service
COPY training training
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/valley/bin:$PATH \
    VALLEY_REPOSITORY=/models \
    VALLEY_HOST=0.0.0.0
# The interpreter is the base image's Ubuntu python3 (3.12); the base image's tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY deploy/docker/constraints-serve.txt /tmp/constraints.txt
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    python3 -m venv /opt/valley \
    && /opt/valley/bin/pip install --no-cache-dir -c /tmp/constraints.txt --find-links /wheels \
       "valley-ensembles[serve]==0.1.0" \
    && rm /tmp/constraints.txt \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin valley
USER 10001:10001
EXPOSE 8000 8001 8002
# Every address of the container: valley-serve then needs --tokens-file (or VALLEY_TOKENS_FILE), or
# VALLEY_INSECURE=true to accept plain access for everyone (docs/serving.md, "Security").
ENTRYPOINT ["valley-serve"]
