#!/usr/bin/env bash
# Builds the dynkv container image FROM scratch out of the release binary.
#
#   deploy/build-image.sh [TAG]          # default tag: dynkv:local
#
# Runs `cargo build --release` (skip with DYNKV_SKIP_CARGO=1), prepares a temporary build
# context holding the binary, the shared libraries `ldd` lists and the dynamic loader at
# their absolute paths, and runs `docker build` on it. Nothing is pulled.
set -euo pipefail

tag=${1:-dynkv:local}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if [[ ${DYNKV_SKIP_CARGO:-0} != 1 ]]; then
  cargo build --release --quiet
fi
binary=${CARGO_TARGET_DIR:-$root/target}/release/dynkv
[[ -x $binary ]] || { echo "build-image: no binary at $binary" >&2; exit 1; }

context=$(mktemp -d "${TMPDIR:-/tmp}/dynkv-image.XXXXXX")
trap 'rm -rf "$context"' EXIT

mkdir -p "$context/rootfs/usr/local/bin"
cp "$binary" "$context/rootfs/usr/local/bin/dynkv"
# `ldd` lines: "libx.so => /path/libx.so (0x..)", "/lib64/ld-linux-x86-64.so.2 (0x..)" and
# "linux-vdso.so.1 (0x..)" (in the kernel: nothing to copy). Copy each file at its path,
# following symlinks so the image holds real files.
ldd "$binary" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' | sort -u |
  while read -r lib; do
    mkdir -p "$context/rootfs$(dirname "$lib")"
    cp -L "$lib" "$context/rootfs$lib"
  done
# The loader must also be where the binary's PT_INTERP says, which ldd prints above.
mkdir -p "$context/rootfs/tmp"
chmod 1777 "$context/rootfs/tmp"
cp deploy/Dockerfile "$context/Dockerfile"

DOCKER_BUILDKIT=0 docker build --quiet -t "$tag" "$context" >/dev/null
echo "built image $tag"
