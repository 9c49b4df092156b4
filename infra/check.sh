#!/usr/bin/env bash
# Static checks of the container infrastructure; needs no Docker engine.
#
#   infra/check.sh
#
# 1. infra/docker-compose.yml must validate (`docker-compose config -q`). The
#    Debian `docker-compose` package is installed with apt-get when neither
#    `docker-compose` nor the `docker compose` plugin is present.
# 2. Every local source of a COPY in infra/Dockerfile must exist in the build
#    context (the repository root), so that the image build cannot fail on a
#    missing file.
#
# 3. The Kubernetes manifests (infra/k8s) must validate strictly against the
#    Kubernetes API schemas (PyPI kubernetes-validate, from the project's venv).
#
# Exits non-zero on the first failure.

set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
compose_file="$here/docker-compose.yml"
dockerfile="$here/Dockerfile"

log() { printf 'check.sh: %s\n' "$*" >&2; }

install_docker_compose() {
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo -n)
        else
            log "docker-compose is missing and we are not root (no sudo)"
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        log "docker-compose is missing and apt-get is not available"
        return 1
    fi
    log "installing docker-compose with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
}

compose=()
if command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
elif command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    install_docker_compose
    compose=(docker-compose)
fi

# --- 1. compose file -------------------------------------------------------
log "validating $compose_file with ${compose[*]}"
"${compose[@]}" -f "$compose_file" config -q
services="$("${compose[@]}" -f "$compose_file" config --services | sort | tr '\n' ' ')"
expected="agents auth broker browsers desktops gateway metrics minio minio-init notifier postgres recorder runs vmmgr "
if [ "$services" != "$expected" ]; then
    log "unexpected services: '$services' (expected '$expected')"
    exit 1
fi

# --- 2. Dockerfile COPY sources --------------------------------------------
log "checking COPY sources of $dockerfile"
missing=0
while read -r -a words; do
    # words: COPY [--flags...] src... dest ; skip copies from other stages.
    srcs=()
    from_stage=0
    for w in "${words[@]:1}"; do
        case "$w" in
            --from=*) from_stage=1 ;;
            --*) ;;
            *) srcs+=("$w") ;;
        esac
    done
    [ "$from_stage" -eq 1 ] && continue
    unset 'srcs[${#srcs[@]}-1]'  # the destination
    for s in "${srcs[@]}"; do
        if [ ! -e "$root/$s" ]; then
            log "COPY source missing from the build context: $s"
            missing=1
        fi
    done
done < <(grep -E '^[[:space:]]*COPY[[:space:]]' "$dockerfile")
if [ "$missing" -ne 0 ]; then
    exit 1
fi

# --- 3. Kubernetes manifests -----------------------------------------------
venv="${DOVECOTE_VENV:-$root/.venv}"
log "validating the Kubernetes manifests in $here/k8s"
"$venv/bin/python" - "$here/k8s" <<'PY'
import sys
from pathlib import Path

import kubernetes_validate
import yaml

k8s = Path(sys.argv[1])
resources = yaml.safe_load((k8s / "kustomization.yaml").read_text())["resources"]
for name in resources:
    for doc in yaml.safe_load_all((k8s / name).read_text()):
        if doc:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
print(f"check.sh: {len(resources)} manifest files valid", file=sys.stderr)
PY

log "ok"
