# Prometheus from Debian's package, for machines that cannot pull prom/prometheus (no image
# registry): deploy/compose.yaml uses it when PROMETHEUS_IMAGE names it. It takes the same
# arguments as the official image (compose passes --config.file and --storage.tsdb.path).
#
#   deploy/images/build.sh prometheus            # -> localhost/opsloop-prometheus
ARG BASE=python:3.11-slim
FROM ${BASE}
# Debian stable's version is fixed within its release (2.42 in bookworm), so it is not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown 65534:65534 /prometheus
# nobody, as in the official image.
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9090/-/healthy', timeout=2)"]
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="opsloop-prometheus" \
      org.opencontainers.image.description="prometheus from Debian's package, for opsloop's local stack" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
