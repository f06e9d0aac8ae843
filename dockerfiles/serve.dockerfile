# The inference server: serving dependencies only (the base install and the PostgreSQL driver:
# no torch, Lightning or MLflow), pinned from uv.lock, as a non-root user, healthy once a model
# is loaded.
#
#   make images                                   # or: deploy/images/build.sh serve
#   docker run --rm -p 8000:8000 -v "$PWD/bundles/digits-cnn:/bundle:ro" localhost/opsloop-serve
#
# Any OPSLOOP_* variable configures it (docs/serving.md). The base image is a build argument
# (`--build-arg BASE=python:3.11-slim`, the default). The first stage is the same in every
# opsloop image, so the images share its cached layers.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON=/opt/opsloop/bin/python
# uv lives in its own venv of the build stage: it exports uv.lock and installs, and stays behind.
RUN python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install uv==0.13.9 \
    && python3 -m venv /opt/opsloop
ENV PATH=/opt/uv/bin:/opt/opsloop/bin:$PATH
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
# Exact versions from uv.lock, no dev/docs groups: what the CLI and serving need, plus the
# PostgreSQL driver (the `postgres` extra) for a prediction log or tracking store at scale.
# The export is the whole closure, so nothing is resolved again (--no-deps).
RUN uv export --frozen --no-default-groups --no-emit-project --no-hashes --extra postgres \
        --format requirements-txt --quiet --output-file /tmp/base.txt \
    && uv pip install --compile-bytecode --no-deps --requirement /tmp/base.txt
RUN uv pip check

# The project itself as a wheel, in a stage of its own: a change to src/ rebuilds this stage and
# the image's last layers only, never the dependencies above.
FROM build AS wheel
COPY src ./src
RUN uv build --wheel --out-dir /dist

FROM ${BASE}
RUN groupadd --system --gid 10001 opsloop \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/opsloop opsloop \
    && mkdir -p /var/lib/opsloop \
    && chown opsloop:opsloop /var/lib/opsloop
COPY --from=build /opt/opsloop /opt/opsloop
COPY --from=wheel /dist /tmp/dist
RUN /opt/opsloop/bin/pip install --no-cache-dir --no-deps --no-index /tmp/dist/opsloop-*.whl \
    && rm -rf /tmp/dist
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
# Last, so a new commit rebuilds no layer above: which source and commit this image is.
ARG GIT_COMMIT=unknown
ARG VERSION=0.0.0
LABEL org.opencontainers.image.title="opsloop-serve" \
      org.opencontainers.image.description="opsloop inference API (Open Inference Protocol V2)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
