# The loop controller: `opsloop loop serve` without torch. It decides and records; the retrain
# itself runs elsewhere, in the train image: a Kubernetes Job made from the retrain template
# (OPSLOOP_LOOP_RUNNER=kubernetes, the default here, with kubectl on board) or a CI workflow
# dispatch (OPSLOOP_LOOP_RUNNER=dispatch). Where the loop should retrain in its own container
# (the `process` runner, as in deploy/compose.yaml), run `opsloop loop serve` from the train
# image instead: a local retrain needs torch (docs/deployment.md).
#
#   make images                                   # or: deploy/images/build.sh loop
#   docker run --rm -p 8002:8002 -v opsloop-data:/var/lib/opsloop \
#     -e OPSLOOP_LOOP_RUNNER=dispatch ... localhost/opsloop-loop
#
# Any OPSLOOP_LOOP_* variable configures it (docs/loop.md). Its dependencies are the monitor
# image's (the loop computes accuracy and drift evidence with the monitor's code), installed by
# the same instructions, so the two images share those layers. kubectl comes from the official
# image (KUBECTL_IMAGE); deploy/images/build.sh makes a local one where no registry answers.
ARG BASE=python:3.11-slim
ARG KUBECTL_IMAGE=registry.k8s.io/kubectl:v1.31.9

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

# The kubectl the `kubernetes` runner calls (a static binary; within one minor of the cluster).
FROM ${KUBECTL_IMAGE} AS kubectl

FROM ${BASE}
RUN groupadd --system --gid 10001 opsloop \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/opsloop opsloop \
    && mkdir -p /var/lib/opsloop \
    && chown opsloop:opsloop /var/lib/opsloop
COPY --from=build /opt/opsloop /opt/opsloop
COPY --from=wheel /dist /tmp/dist
RUN /opt/opsloop/bin/pip install --no-cache-dir --no-deps --no-index /tmp/dist/opsloop-*.whl \
    && rm -rf /tmp/dist
# Everything above is the monitor image's, layer for layer; the loop's own start here.
COPY --from=kubectl /bin/kubectl /usr/local/bin/kubectl
# The configs the retrain's overrides are checked against (where the champion's bundle lives).
COPY configs /opt/opsloop/configs
# HOME in /tmp: kubectl keeps its discovery cache there, and /tmp is the one writable place of
# a read-only root filesystem (deploy/k8s mounts an emptyDir).
ENV PATH=/opt/opsloop/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    OPSLOOP_CONFIG_DIR=/opt/opsloop/configs \
    OPSLOOP_LOOP_HOST=0.0.0.0 \
    OPSLOOP_LOOP_PORT=8002 \
    OPSLOOP_LOOP_WORKSPACE=/var/lib/opsloop \
    OPSLOOP_LOOP_RUNNER=kubernetes \
    OPSLOOP_LOOP_JOB_TEMPLATE=cronjob/opsloop-retrain \
    OPSLOOP_WORKSPACE=/var/lib/opsloop
USER 10001:10001
WORKDIR /var/lib/opsloop
EXPOSE 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('OPSLOOP_LOOP_PORT', '8002'), timeout=2)"]
ENTRYPOINT ["opsloop", "loop", "serve"]
# Last, so a new commit rebuilds no layer above: which source and commit this image is.
ARG GIT_COMMIT=unknown
ARG VERSION=0.0.0
LABEL org.opencontainers.image.title="opsloop-loop" \
      org.opencontainers.image.description="opsloop loop controller (retrains through Kubernetes Jobs or CI dispatch; no torch)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
