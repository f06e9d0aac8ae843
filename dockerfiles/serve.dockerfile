# The inference server image: serving dependencies only (the base install — no torch, Lightning or
# MLflow), pinned from uv.lock, running as a non-root user, healthy once a model is loaded.
#
#   docker build -f dockerfiles/serve.dockerfile -t opsloop-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/bundles/digits-cnn-v3:/bundle:ro" opsloop-serve
#
# Any OPSLOOP_* variable configures it (docs/serving.md); the base image is a build argument.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python3 -m venv /opt/opsloop
ENV PATH=/opt/opsloop/bin:$PATH
COPY pyproject.toml uv.lock README.md ./
# Exact versions from uv.lock: no extras and no dev/docs groups, i.e. only what serving needs.
RUN pip install uv==0.13.9 \
    && uv export --frozen --no-default-groups --no-emit-project --no-hashes \
        --format requirements-txt --output-file /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt \
    && pip uninstall --yes uv
COPY src ./src
RUN pip install --no-deps .

FROM ${BASE}
RUN groupadd --system --gid 10001 opsloop \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/opsloop opsloop \
    && mkdir -p /var/lib/opsloop \
    && chown opsloop:opsloop /var/lib/opsloop
COPY --from=build /opt/opsloop /opt/opsloop
ENV PATH=/opt/opsloop/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OPSLOOP_HOST=0.0.0.0 \
    OPSLOOP_PORT=8000 \
    OPSLOOP_WORKERS=2 \
    OPSLOOP_BUNDLE_PATH=/bundle \
    OPSLOOP_WORKSPACE=/var/lib/opsloop
USER 10001:10001
WORKDIR /var/lib/opsloop
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('OPSLOOP_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["opsloop", "serve"]
