# The training image: the `train` extra (Lightning, MLflow, DVC, Optuna, ONNX export) with a CPU
# build of torch, pinned from uv.lock, running any `opsloop` stage as a non-root user in the
# workspace mounted at /workspace (data, mlflow.db, bundles and reports are written there).
#
#   make images                                   # or: deploy/images/build.sh train
#   docker run --rm -u "$(id -u):$(id -g)" -v "$PWD:/workspace" localhost/opsloop-train \
#     pipeline experiment=tiny
#
# torch comes from PyTorch's CPU index (TORCH_INDEX_URL) at uv.lock's version, or from a local
# directory of wheels (TORCH_FIND_LINKS, mounted at build time) with TORCH_SPEC naming the
# version: a CUDA build from PyPI would add about 3 GB. The configs the code was built with are
# baked in (OPSLOOP_CONFIG_DIR); set it to /workspace/configs to use the workspace's own.
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
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
ARG TORCH_SPEC=
# Everything of the train extra but torch and its CUDA libraries, then a CPU torch on its own.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN uv export --frozen --no-default-groups --no-emit-project --no-hashes --extra train \
        --format requirements-txt --quiet --output-file /tmp/train-all.txt \
    && grep -vE '^(torch==|triton==|nvidia-|cuda-)' /tmp/train-all.txt >/tmp/train.txt \
    && uv pip install --compile-bytecode --no-deps --requirement /tmp/train.txt \
    && spec=${TORCH_SPEC:-$(grep -oE '^torch==[^ ;]+' /tmp/train-all.txt)} \
    && if [ -n "$TORCH_FIND_LINKS" ]; then \
         uv pip install --compile-bytecode --no-deps --no-index --find-links "$TORCH_FIND_LINKS" "$spec"; \
       else \
         uv pip install --compile-bytecode --no-deps --index-url "$TORCH_INDEX_URL" "$spec"; \
       fi
RUN uv pip check

# The project itself as a wheel, in a stage of its own: a change to src/ rebuilds this stage and
# the image's last layers only, never the dependencies above.
FROM build AS wheel
COPY src ./src
RUN uv build --wheel --out-dir /dist

FROM ${BASE}
RUN groupadd --system --gid 10001 opsloop \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /workspace opsloop \
    && mkdir -p /workspace \
    && chown opsloop:opsloop /workspace
COPY --from=build /opt/opsloop /opt/opsloop
COPY --from=wheel /dist /tmp/dist
RUN /opt/opsloop/bin/pip install --no-cache-dir --no-deps --no-index /tmp/dist/opsloop-*.whl \
    && rm -rf /tmp/dist
COPY configs /opt/opsloop/configs
# HOME in /tmp: any user id (`-u $(id -u)`) can write the caches MLflow and Lightning keep there.
ENV PATH=/opt/opsloop/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLBACKEND=Agg \
    DVC_NO_ANALYTICS=1 \
    OPSLOOP_CONFIG_DIR=/opt/opsloop/configs
USER 10001:10001
WORKDIR /workspace
# A batch job, not a server: it succeeds or fails by its exit status.
HEALTHCHECK NONE
ENTRYPOINT ["opsloop"]
CMD ["pipeline"]
# Last, so a new commit rebuilds no layer above: which source and commit this image is.
ARG GIT_COMMIT=unknown
ARG VERSION=0.0.0
LABEL org.opencontainers.image.title="opsloop-train" \
      org.opencontainers.image.description="opsloop training and pipeline stages (CPU torch)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
