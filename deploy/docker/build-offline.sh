#!/bin/sh
# Build the image where no container registry is reachable, from Debian's
# packages only: debootstrap a bookworm rootfs, commit it as the base image,
# then build the Dockerfile on it with buildah (rootful, vfs storage, chroot
# isolation: no daemon, no overlayfs, no user namespaces needed).
#
# The stand-in base trusts the build host's CA bundle (PIP_CERT), for build
# hosts whose HTTPS goes through an intercepting proxy; with a registry,
# `docker build .` on the real debian:bookworm-slim needs none of this.
#
# usage: deploy/docker/build-offline.sh [TAG]      (run as root, from anywhere)
set -eu

tag=${1:-localhost/tlsproxy:dev}
base=localhost/tlsproxy-base:bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
repo=$(cd "$(dirname "$0")/../.." && pwd)
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot

if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror"
    rm -f "$rootfs"/var/cache/apt/archives/*.deb # 115 MB of downloaded packages
    mkdir -p "$rootfs/etc/ssl"
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/build-host-ca.crt"
    ctr=$(buildah from scratch)
    buildah copy --quiet "$ctr" "$rootfs" /
    buildah config --env PIP_CERT=/etc/ssl/build-host-ca.crt --cmd /bin/bash "$ctr"
    buildah commit --quiet --rm "$ctr" "$base"
fi

buildah bud --layers=false --build-arg BASE_IMAGE="$base" -t "$tag" "$repo"
