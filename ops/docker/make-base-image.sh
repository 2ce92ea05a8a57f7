#!/usr/bin/env bash
# Builds a Debian bookworm image with Python 3 and venv, offline from any registry: debootstrap from the apt
# mirror this machine uses, then `docker import`. It stands in for python:3.11-slim (and, with packages added by
# ops/docker/standins.Dockerfile, for the Redis, Prometheus and HAProxy images) where nothing can be pulled.
# Usage: bash ops/docker/make-base-image.sh [TAG]      (default synapse-base:bookworm; FORCE=1 rebuilds)
#   DEBIAN_MIRROR overrides the mirror (default: the first deb.debian.org-style URI in /etc/apt/sources.list*).
set -euo pipefail

tag="${1:-synapse-base:bookworm}"
suite=bookworm
packages=python3,python3-venv,ca-certificates

if [[ -z "${FORCE:-}" ]] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base_image_present tag=$tag"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: run bash ops/setup.sh" >&2; exit 1; }

# The mirror apt already uses here (deb822 "URIs:" or one-line "deb URI suite" entries), main archive only.
mirror="${DEBIAN_MIRROR:-$( (grep -hoE '(URIs:|^deb)[[:space:]]+[^[:space:]]+/debian/?([[:space:]]|$)' \
  /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true) \
  | awk '{print $2}' | head -n1)}"
mirror="${mirror:-http://deb.debian.org/debian}"
security="${mirror%/debian*}/debian-security"

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
started=$SECONDS
echo "debootstrap suite=$suite mirror=$mirror packages=$packages"
debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >"$root.log" 2>&1 \
  || { tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

# apt inside the image: the same mirror, with updates and security, as the official Debian images have.
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security $suite-security main
SOURCES
# Packages installed in a build must not try to start their services (there is no init in a container).
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
# As the official images: no recommends, no docs, no apt caches in layers.
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$root/etc/apt/apt.conf.d/90synapse"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb "$root"/usr/share/doc/* "$root"/usr/share/man/*

tar -C "$root" --numeric-owner -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$tag" >/dev/null
echo "base_image_built tag=$tag seconds=$((SECONDS - started)) size=$(docker image inspect -f '{{.Size}}' "$tag")"
