#!/usr/bin/env bash
# Build opsloop's container images from dockerfiles/ (what `make images` runs).
#
#   deploy/images/build.sh                    # every dockerfiles/*.dockerfile
#   deploy/images/build.sh serve monitor      # some of them
#   deploy/images/build.sh prometheus         # a stack image from deploy/images/ (see below)
#
# ENGINE  docker when its engine answers, else podman (override: ENGINE=podman)
# BASE    the base image, passed to every Dockerfile as a build argument. Default
#         python:3.11-slim when the engine has it or can pull it, else `local`.
#         BASE=local bootstraps Debian bookworm with debootstrap (root, no registry needed),
#         once: it is kept as localhost/opsloop-base:bookworm and reused.
# PREFIX  image names are ${PREFIX}<name>:${TAG} and ${PREFIX}<name>:latest
#         (default localhost/opsloop-)
# TAG     default: the short git commit
# TORCH_WHEELS  a directory holding a CPU build of torch (torch-*+cpu*.whl) for the train
#         image, mounted into the build (podman only); without it the train image takes torch
#         from PyTorch's CPU index.
# KUBECTL_IMAGE  the image the loop image copies kubectl from (default: the Dockerfile's,
#         registry.k8s.io/kubectl). Where it cannot be pulled, the kubectl installed here (of the
#         same minor version when there is one) is imported as localhost/opsloop-kubectl:<version>.
#
# Stack images (deploy/images/<name>.dockerfile: prometheus, alertmanager) install the
# third-party servers from Debian's packages on the same base, for machines without a registry.
set -euo pipefail
cd "$(dirname "$0")/../.."

LOCAL_BASE=localhost/opsloop-base:bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PREFIX=${PREFIX:-localhost/opsloop-}
commit=$(git rev-parse --verify --quiet HEAD 2>/dev/null || echo unknown)
TAG=${TAG:-${commit:0:12}}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)

log() { printf 'build: %s\n' "$*" >&2; }

if [[ -z ${ENGINE:-} ]]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    ENGINE=docker
  elif command -v podman >/dev/null 2>&1; then
    ENGINE=podman
  else
    log "neither a Docker engine nor podman is available (apt-get install podman buildah runc)"
    exit 2
  fi
fi
build_flags=()
if [[ $ENGINE == podman ]]; then
  export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/images/containers.conf}
  # chroot isolation builds without a container runtime inside containers and CI sandboxes.
  build_flags+=(--isolation "${BUILDAH_ISOLATION:-chroot}" --format docker)
fi

# The Debian base: debootstrap's minimal system plus Python, imported as an image. The host's
# CA bundle goes in with it, so that pip and uv inside builds trust what the host trusts
# (proxies with their own CA); the Dockerfiles themselves stay as they would be anywhere.
build_local_base() {
  if $ENGINE image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    log "reusing $LOCAL_BASE"
    return
  fi
  command -v debootstrap >/dev/null || { log "BASE=local needs debootstrap (apt-get install debootstrap)"; exit 2; }
  local root
  root=$(mktemp -d)
  trap 'rm -rf "$root"' RETURN
  log "bootstrapping Debian bookworm into $LOCAL_BASE (about a minute)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$DEBIAN_MIRROR" >"$root.log" 2>&1 || { cat "$root.log" >&2; exit 1; }
  rm -f "$root.log"
  local ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
  [[ -f $ca ]] && cp "$ca" "$root/etc/ssl/certs/ca-certificates.crt"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | $ENGINE import \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$LOCAL_BASE" >/dev/null
}

if [[ -z ${BASE:-} ]]; then
  BASE=python:3.11-slim
  if ! $ENGINE image inspect "$BASE" >/dev/null 2>&1 \
    && ! timeout 120 "$ENGINE" pull -q "docker.io/library/$BASE" >/dev/null 2>&1; then
    log "cannot pull $BASE: using a local Debian base (BASE=local)"
    BASE=local
  fi
fi
if [[ $BASE == local ]]; then
  build_local_base
  BASE=$LOCAL_BASE
fi

# kubectl for the loop image: the official image, else this machine's kubectl as an image.
kubectl_image() {
  local wanted
  wanted=$(sed -n 's/^ARG KUBECTL_IMAGE=//p' dockerfiles/loop.dockerfile)
  if $ENGINE image inspect "$wanted" >/dev/null 2>&1 \
    || timeout 120 "$ENGINE" pull -q "$wanted" >/dev/null 2>&1; then
    echo "$wanted"
    return
  fi
  local found binary minor version image root
  found=$(command -v kubectl) || {
    log "cannot pull $wanted and no kubectl here: set KUBECTL_IMAGE"
    exit 2
  }
  binary=$(readlink -f "$found")
  # gcloud's kubectl is a dispatcher with one binary per minor version beside it.
  minor=$(echo "${wanted##*:v}" | cut -d. -f1-2)
  [[ -x $(dirname "$binary")/kubectl.$minor ]] && binary=$(dirname "$binary")/kubectl.$minor
  version=$("$binary" version --client --output=yaml | sed -n 's/^  gitVersion: //p')
  image=localhost/opsloop-kubectl:${version:-unknown}
  if ! $ENGINE image inspect "$image" >/dev/null 2>&1; then
    log "cannot pull $wanted: importing $binary as $image"
    root=$(mktemp -d)
    mkdir "$root/bin"
    cp "$binary" "$root/bin/kubectl"
    tar -C "$root" -c . | $ENGINE import --change 'ENTRYPOINT ["/bin/kubectl"]' - "$image" >/dev/null
    rm -rf "$root"
  fi
  echo "$image"
}

log "commit $commit, base $BASE, engine $ENGINE"
names=("$@")
if ((${#names[@]} == 0)); then
  for file in dockerfiles/*.dockerfile; do
    names+=("$(basename "$file" .dockerfile)")
  done
fi

for name in "${names[@]}"; do
  file=dockerfiles/$name.dockerfile
  [[ -f $file ]] || file=deploy/images/$name.dockerfile
  [[ -f $file ]] || { log "no dockerfiles/$name.dockerfile or deploy/images/$name.dockerfile"; exit 2; }
  args=(--build-arg "BASE=$BASE" --build-arg "GIT_COMMIT=$commit" --build-arg "VERSION=$version")
  # The same labels on the command line: buildah's layer cache ignores a changed build argument
  # in a LABEL instruction (a new commit with no other change kept the old commit's label).
  args+=(--label "org.opencontainers.image.revision=$commit"
    --label "org.opencontainers.image.version=$version")
  if [[ $name == train ]]; then
    wheels=${TORCH_WHEELS:-/opt/wheels}
    wheel=$(find "$wheels" -maxdepth 1 -name 'torch-*+cpu-*.whl' 2>/dev/null | sort | tail -n 1)
    if [[ $ENGINE == podman && -n $wheel ]]; then
      torch_version=$(basename "$wheel" | cut -d- -f2)
      log "train: torch ${torch_version} from $wheels"
      args+=(-v "$wheels:/wheels:ro" --build-arg TORCH_FIND_LINKS=/wheels
        --build-arg "TORCH_SPEC=torch==${torch_version%%+*}")
    fi
  fi
  if [[ $name == loop ]]; then
    KUBECTL_IMAGE=${KUBECTL_IMAGE:-$(kubectl_image)}
    log "loop: kubectl from $KUBECTL_IMAGE"
    args+=(--build-arg "KUBECTL_IMAGE=$KUBECTL_IMAGE")
  fi
  log "$name: $file on $BASE"
  start=$SECONDS
  $ENGINE build "${build_flags[@]}" "${args[@]}" -f "$file" \
    -t "$PREFIX$name:$TAG" -t "$PREFIX$name:latest" .
  log "$name: built $PREFIX$name:$TAG in $((SECONDS - start)) s"
done
