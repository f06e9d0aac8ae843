#!/usr/bin/env bash
# Build dockerfiles/serve.dockerfile with podman and check the container serves a bundle.
# For machines without a Docker engine or registry access (see docs/serving.md, "Container"):
# needs `apt-get install podman buildah runc debootstrap`; builds a local Debian base image.
#
#   dockerfiles/check_serve_image.sh BUNDLE_DIR [PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=$(realpath "${1:?usage: $0 BUNDLE_DIR [PORT]}")
port=${2:-18080}
work=$(mktemp -d)
name=opsloop-serve-check-$$
export CONTAINERS_CONF="$work/containers.conf"
printf '[containers]\ndefault_ulimits = []\n' >"$CONTAINERS_CONF"
podman_run() { podman --runtime runc --cgroup-manager=cgroupfs "$@"; }
cleanup() {
  podman_run rm --force "$name" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

if ! podman image exists localhost/debpy:bookworm; then
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
    "$work/root" http://deb.debian.org/debian >"$work/debootstrap.log"
  tar -C "$work/root" -c . | podman import - localhost/debpy:bookworm >/dev/null
fi

# pip inside the build trusts the host's CA bundle (PIP_CERT), as everything else here does.
cert=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
podman build --isolation chroot --format docker -v "$cert:/etc/pip-ca.crt:ro" \
  --env PIP_CERT=/etc/pip-ca.crt --build-arg BASE=localhost/debpy:bookworm \
  -f dockerfiles/serve.dockerfile -t localhost/opsloop-serve:check .

podman_run run -d --name "$name" --network host -e OPSLOOP_PORT="$port" \
  -e OPSLOOP_PREDLOG_URL=none -v "$bundle:/bundle:ro" localhost/opsloop-serve:check >/dev/null
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$port/v2/health/ready" >/dev/null && break
  sleep 1
done
curl -sf "http://127.0.0.1:$port/v2/health/ready"
echo
podman_run healthcheck run "$name" && echo "healthcheck: healthy"
podman_run exec "$name" sh -c 'id -u; ! python3 -c "import torch" 2>/dev/null' \
  && echo "runs as non-root, without torch"
