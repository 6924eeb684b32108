#!/usr/bin/env bash
# A Debian bookworm base image made on this machine, for builds where no image registry is
# reachable (docker/compose.local.yaml builds every service on it):
#   sudo docker/base-image.sh                  # the image worldplan-base:bookworm
#   sudo docker/base-image.sh NAME             # another name
# debootstrap (minbase) needs root and Debian's mirror (DEBIAN_MIRROR to use another).
# Its root file system is kept as a tarball under ~/.cache/worldplan/: a later call, or the
# next CI run on the machine, imports that instead of running debootstrap again.
set -euo pipefail

name=${1:-worldplan-base:bookworm}
cache=${WORLDPLAN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/worldplan}
tarball=$cache/debian-bookworm-minbase.tar
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$name" >/dev/null 2>&1; then
    echo "base image $name: present"
    exit 0
fi

if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || {
        echo "debootstrap not found (Debian: apt-get install debootstrap)" >&2
        exit 1
    }
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    echo "debootstrap bookworm (minbase) from $mirror"
    debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
        tail -20 "$root.log" >&2
        exit 1
    }
    rm -f "$root.log"
    # security and point-release updates, as on a Debian host
    cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${mirror%/debian}/debian-security bookworm-security main
EOF
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    mkdir -p "$cache"
    tar -C "$root" -c . >"$tarball.part"
    mv "$tarball.part" "$tarball"
fi

docker import --change 'CMD ["bash"]' "$tarball" "$name" >/dev/null
echo "base image $name: imported from $tarball"
