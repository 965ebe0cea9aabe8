# valley-train with PyTorch (CUDA wheels; they run on the CPU too), for Jobs under torchrun; with the
# serving extra for valley-reload, which makes running servers load the version a Job exported.
#   docker build -f deploy/docker/train.Dockerfile -t valley-train .
# Datasets and run directories are volumes: /data (read-only) and /runs.

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
    MPLCONFIGDIR=/tmp/matplotlib
COPY deploy/docker/constraints-serve.txt deploy/docker/constraints-train.txt /tmp/
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    python -m venv /opt/valley \
    && /opt/valley/bin/pip install --no-cache-dir -c /tmp/constraints-serve.txt -c /tmp/constraints-train.txt \
       --find-links /wheels "valley-ensembles[train,serve]==0.1.0" \
    && rm /tmp/constraints-serve.txt /tmp/constraints-train.txt \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin valley
USER 10001:10001
WORKDIR /runs
ENTRYPOINT ["valley-train"]
