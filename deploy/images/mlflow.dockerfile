# An MLflow tracking server at uv.lock's version with the PostgreSQL (psycopg2) and Cloud
# Storage clients, for a backend store on Cloud SQL and artifacts in a bucket
# (deploy/gcp/mlflow.yaml); the official ghcr.io/mlflow/mlflow image carries neither.
#
#   deploy/images/build.sh mlflow                 # -> localhost/opsloop-mlflow
ARG BASE=python:3.11-slim
FROM ${BASE}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/mlflow/bin:$PATH \
    PYTHONUNBUFFERED=1
COPY uv.lock /tmp/uv.lock
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The version uv.lock pins, so the server and opsloop's client always match.
RUN version=$(grep -A1 '^name = "mlflow"$' /tmp/uv.lock | sed -n 's/^version = "\(.*\)"/\1/p') \
    && python3 -m venv /opt/mlflow \
    && pip install "mlflow==${version}" "psycopg2-binary==2.9.*" "google-cloud-storage==3.*" \
    && rm /tmp/uv.lock \
    && groupadd --system --gid 10001 mlflow \
    && useradd --system --uid 10001 --gid 10001 --no-create-home mlflow
USER 10001:10001
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:5000/health', timeout=2)"]
ENTRYPOINT ["mlflow"]
CMD ["server", "--host=0.0.0.0", "--port=5000"]
