# The drift-monitor image: the serving dependencies plus the `monitor` extra (Evidently, pandas,
# scipy), pinned from uv.lock, running `opsloop monitor serve` as a non-root user.
#
#   docker build -f dockerfiles/monitor.dockerfile -t opsloop-monitor .
#   docker run --rm -p 8001:8001 -v "$PWD/bundles/digits-cnn:/bundle:ro" \
#     -v "$PWD:/var/lib/opsloop" opsloop-monitor
#
# Any OPSLOOP_MONITOR_* variable configures it (docs/monitoring.md); the base image is a build
# argument, as for dockerfiles/serve.dockerfile.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python3 -m venv /opt/opsloop
ENV PATH=/opt/opsloop/bin:$PATH
COPY pyproject.toml uv.lock README.md ./
RUN pip install uv==0.13.9 \
    && uv export --frozen --no-default-groups --extra monitor --no-emit-project --no-hashes \
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
    OPSLOOP_MONITOR_HOST=0.0.0.0 \
    OPSLOOP_MONITOR_PORT=8001 \
    OPSLOOP_MONITOR_BUNDLE_PATH=/bundle \
    OPSLOOP_MONITOR_PREDLOG_URL=sqlite:////var/lib/opsloop/predictions.db
USER 10001:10001
WORKDIR /var/lib/opsloop
EXPOSE 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('OPSLOOP_MONITOR_PORT', '8001'), timeout=2)"]
ENTRYPOINT ["opsloop", "monitor", "serve"]
