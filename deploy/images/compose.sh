#!/usr/bin/env bash
# Start or stop the local ops stack, deploy/compose.yaml (what `make stack-up` and
# `make stack-down` run):
#
#   deploy/images/compose.sh up       # build the images, start everything on 127.0.0.1
#   deploy/images/compose.sh down     # stop it; the volumes (prediction log, MLflow) stay
#
# `docker compose` when a Docker engine answers, else podman-compose. Where the official
# third-party images cannot be pulled (no registry), Prometheus and Alertmanager are built from
# Debian's packages (deploy/images/), MLflow runs from the opsloop train image, and Grafana, which
# Debian does not package, is left out. Ports and images: see the variables in deploy/compose.yaml.
set -euo pipefail
cd "$(dirname "$0")/../.."

PROJECT=${COMPOSE_PROJECT_NAME:-opsloop}
log() { printf 'stack: %s\n' "$*" >&2; }

if [[ -z ${ENGINE:-} ]]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    ENGINE=docker
  else
    ENGINE=podman
  fi
fi
export ENGINE
if [[ $ENGINE == docker ]]; then
  compose=(docker compose -f deploy/compose.yaml -p "$PROJECT")
else
  command -v podman-compose >/dev/null || { log "podman-compose is not installed"; exit 2; }
  export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/images/containers.conf}
  compose=(podman-compose -f deploy/compose.yaml -p "$PROJECT")
fi

case ${1:-} in
  up)
    bundle=${OPSLOOP_BUNDLE_DIR:-bundles/digits-cnn}
    [[ -f $bundle/bundle.json ]] || { log "no bundle at $bundle: run \`make run\` first"; exit 2; }
    OPSLOOP_BUNDLE_DIR=$(realpath "$bundle")
    export OPSLOOP_BUNDLE_DIR OPSLOOP_IMAGE_TAG=latest
    services=()
    if ! "$ENGINE" image inspect "${PROMETHEUS_IMAGE:-prom/prometheus:v2.53.0}" >/dev/null 2>&1 \
      && ! timeout 120 "$ENGINE" pull -q "${PROMETHEUS_IMAGE:-prom/prometheus:v2.53.0}" >/dev/null 2>&1; then
      log "no image registry: Prometheus and Alertmanager from Debian's packages, MLflow from" \
        "the train image, no Grafana"
      deploy/images/build.sh serve monitor train ui prometheus alertmanager
      export MLFLOW_IMAGE=localhost/opsloop-train:latest \
        PROMETHEUS_IMAGE=localhost/opsloop-prometheus:latest \
        ALERTMANAGER_IMAGE=localhost/opsloop-alertmanager:latest
      services=(api monitor loop ui mlflow prometheus alertmanager)
    else
      # The loop runs from the train image in the stack (it retrains in a child process).
      deploy/images/build.sh serve monitor train ui
    fi
    "${compose[@]}" up -d "${services[@]}"
    log "API http://127.0.0.1:${OPSLOOP_API_PORT:-8000}/docs," \
      "monitor http://127.0.0.1:${OPSLOOP_MONITOR_PORT:-8001}/drift," \
      "loop http://127.0.0.1:${OPSLOOP_LOOP_PORT:-8002}/history," \
      "app http://127.0.0.1:${OPSLOOP_UI_PORT:-8501}," \
      "MLflow http://127.0.0.1:${MLFLOW_PORT:-5000}," \
      "Prometheus http://127.0.0.1:${PROMETHEUS_PORT:-9090}," \
      "Alertmanager http://127.0.0.1:${ALERTMANAGER_PORT:-9093}"
    ;;
  down)
    "${compose[@]}" down
    # podman-compose 1.0 leaves the project's network behind.
    if [[ $ENGINE == podman ]]; then
      podman network rm --force "${PROJECT}_default" >/dev/null 2>&1 || true
    fi
    log "stopped; the volumes stay (${ENGINE} volume ls)"
    ;;
  *)
    log "usage: $0 up|down"
    exit 2
    ;;
esac
