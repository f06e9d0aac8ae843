# The drift monitor: the serving dependencies plus the `monitor` extra (Evidently, pandas, scipy;
# no torch), pinned from uv.lock, running `opsloop monitor serve` as a non-root user.
#
#   make images                                   # or: deploy/images/build.sh monitor
#   docker run --rm -p 8001:8001 -v "$PWD/bundles/digits-cnn:/bundle:ro" \
#     -v opsloop-data:/var/lib/opsloop localhost/opsloop-monitor
#
# Any OPSLOOP_MONITOR_* variable configures it (docs/monitoring.md). The base image is a build
# argument; the first stage starts as in dockerfiles/serve.dockerfile, sharing its cached layers.
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
RUN uv export --frozen --no-default-groups --no-emit-project --no-hashes --extra monitor \
        --format requirements-txt --quiet --output-file /tmp/monitor.txt \
    && uv pip install --compile-bytecode --no-deps --requirement /tmp/monitor.txt
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
    OPSLOOP_MONITOR_HOST=0.0.0.0 \
    OPSLOOP_MONITOR_PORT=8001 \
    OPSLOOP_MONITOR_BUNDLE_PATH=/bundle \
    OPSLOOP_MONITOR_PREDLOG_URL=sqlite:////var/lib/opsloop/predictions.db \
    OPSLOOP_WORKSPACE=/var/lib/opsloop
USER 10001:10001
WORKDIR /var/lib/opsloop
EXPOSE 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('OPSLOOP_MONITOR_PORT', '8001'), timeout=2)"]
ENTRYPOINT ["opsloop", "monitor", "serve"]
# Last, so a new commit rebuilds no layer above: which source and commit this image is.
ARG GIT_COMMIT=unknown
ARG VERSION=0.0.0
LABEL org.opencontainers.image.title="opsloop-monitor" \
      org.opencontainers.image.description="opsloop drift monitor (Prometheus metrics, drift reports)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
