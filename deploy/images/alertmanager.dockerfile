# Alertmanager from Debian's package, for machines that cannot pull prom/alertmanager (no image
# registry): deploy/compose.yaml uses it when ALERTMANAGER_IMAGE names it. It takes the same
# arguments as the official image (compose passes --config.file and --storage.path).
#
#   deploy/images/build.sh alertmanager          # -> localhost/opsloop-alertmanager
ARG BASE=python:3.11-slim
FROM ${BASE}
# Debian stable's version is fixed within its release (0.25 in bookworm), so it is not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends prometheus-alertmanager \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /alertmanager \
    && chown 65534:65534 /alertmanager
# nobody, as in the official image.
USER 65534:65534
WORKDIR /alertmanager
EXPOSE 9093
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9093/-/healthy', timeout=2)"]
ENTRYPOINT ["/usr/bin/prometheus-alertmanager"]
CMD ["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager"]
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="opsloop-alertmanager" \
      org.opencontainers.image.description="alertmanager from Debian's package, for opsloop's local stack" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
