#!/usr/bin/env bash
# Build the edge binary for another CPU: arm64 or armhf (armv7), in a Debian chroot of that
# architecture run under qemu-user-static. Nuitka cannot cross-compile; this runs the same
# `build/binary.py` natively-in-emulation. See build/README.md ("Cross builds").
#
#   sudo build/cross.sh arm64        # prints the path of outpost-linux-arm64
#
# Idempotent: the chroot, its venv, ccache and the built binary are cached under
# $OUTPOST_CACHE_DIR/cross/<arch>/ (default ~/.cache/outpost); a second run with nothing
# changed only copies the cached binary. The first run takes long (debootstrap ~7 min, then
# the build, everything emulated); nothing here touches the host beyond registering binfmt.
set -euo pipefail

arch=${1:-}
case "$arch" in
arm64) qemu=qemu-aarch64 release=arm64 ;;
armhf) qemu=qemu-arm release=arm ;;
*)
    echo "usage: $0 arm64|armhf" >&2
    exit 2
    ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "$0: needs root (debootstrap, chroot, mounts)" >&2; exit 1; }

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${OUTPOST_CACHE_DIR:-$HOME/.cache/outpost}
root=$cache/cross/$arch
out=$cache/cross/out
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-venv,python3-dev,gcc,libc6-dev,ccache,patchelf,git,ca-certificates
# armv7 has no wheels for these: they build from source.
[ "$arch" = armhf ] && packages=$packages,libsqlite3-dev,libzstd-dev

for tool in debootstrap "$qemu-static" git; do
    command -v "$tool" >/dev/null || {
        echo "$0: $tool is missing: apt-get install debootstrap qemu-user-static git" >&2
        exit 1
    }
done

# binfmt_misc makes the kernel run the chroot's ARM executables through qemu. In a container
# without systemd-binfmt, register the interpreter by hand; the F flag opens it now, so the
# chroot needs no copy of qemu.
[ -e /proc/sys/fs/binfmt_misc/register ] ||
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
if [ ! -e "/proc/sys/fs/binfmt_misc/$qemu" ]; then
    conf=/usr/lib/binfmt.d/$qemu.conf
    [ -r "$conf" ] || { echo "$0: no $conf (is qemu-user-static installed?)" >&2; exit 1; }
    cat "$conf" >/proc/sys/fs/binfmt_misc/register
fi

if [ ! -x "$root/usr/bin/python3" ]; then
    echo "creating the $arch chroot in $root (several minutes)" >&2
    rm -rf "$root"
    debootstrap --arch "$arch" --foreign --variant=minbase --include="$packages" \
        bookworm "$root" "$mirror"
    chroot "$root" /debootstrap/debootstrap --second-stage
fi

# The host's CA bundle and pip settings: PyPI may be reached through a proxy the chroot's own
# bundle does not trust.
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
[ -r /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"

# The sources as committed (a clone, so the build's key and commit are the commit's), the same
# layout build/binary.py expects.
rm -rf "$root/src"
git clone -q "$repo" "$root/src"

mounted=()
cleanup() {
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[$i]}" || true; done
}
trap cleanup EXIT
for fs in proc dev; do
    mkdir -p "$root/$fs"
    if ! mountpoint -q "$root/$fs"; then
        if [ "$fs" = proc ]; then mount -t proc proc "$root/proc"; else mount --bind /dev "$root/dev"; fi
        mounted+=("$root/$fs")
    fi
done

built=$(chroot "$root" env -u PIP_FIND_LINKS sh -c \
    'cd /src && git config --global --add safe.directory /src && python3 build/binary.py' |
    tail -n 1)
mkdir -p "$out"
cp "$root$built" "$out/outpost-linux-$release"
ls -l "$out/outpost-linux-$release" >&2
echo "$out/outpost-linux-$release"
