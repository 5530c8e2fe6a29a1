#!/usr/bin/env bash
# Builds the geobeat image where the Containerfile's build stage cannot pull its Rust image (no
# registry reachable, as on this project's CI machine): compiles geobeat on the host, assembles
# the runtime root filesystem with deploy/container/rootfs.sh, and builds the Containerfile with
# that directory as its `rootfs` stage (podman/buildah skip the build stage then).
#
#   bash deploy/container/build.sh [--tag TAG] [--binary PATH]
#
#   --tag TAG       image name (default geobeat:latest)
#   --binary PATH   use this geobeat binary instead of building target/release/geobeat
#
# Needs podman (Debian: apt-get install podman) and root (rootfs ownership). Prints the image id.
set -euo pipefail
cd "$(dirname "$0")/../.."

tag=geobeat:latest
binary=
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag=$2; shift 2 ;;
        --binary) binary=$2; shift 2 ;;
        *) echo "build.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
if ! command -v podman >/dev/null 2>&1; then
    echo "build.sh: podman is not installed; apt-get install podman (or use buildah bud with the same flags)" >&2
    exit 2
fi
if [ -z "$binary" ]; then
    cargo build --release --locked --bin geobeat
    binary="${CARGO_TARGET_DIR:-target}/release/geobeat"
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/geobeat-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
sh deploy/container/rootfs.sh "$binary" "$work/rootfs"
mkdir "$work/context"
# --isolation chroot: no container runtime is needed for the build (the build stage is skipped);
# --format docker keeps the HEALTHCHECK.
podman build --quiet --isolation chroot --format docker \
    --build-context "rootfs=$work/rootfs" \
    -f Containerfile -t "$tag" "$work/context"
