#!/bin/sh
# Assembles the runtime root filesystem of the geobeat image: the binary, the shared libraries
# it links (as `ldd` lists them: glibc, libm, libgcc_s and the loader; nothing else), a
# non-root user `geobeat` (uid/gid 10001), the data volume /var/lib/geobeat (mode 0700, owned by
# that user) and empty mount points for what a container engine provides (/proc, /sys, /dev,
# /tmp). No shell, no package manager, no libraries the binary does not load.
#
#   sh deploy/container/rootfs.sh BINARY OUT_DIR
#
# Used by the Containerfile's build stage and by deploy/container/build.sh (which builds on the
# host where no Rust image can be pulled). Run as root so that ownership is set; OUT_DIR must
# not exist or be empty.
set -eu

if [ $# -ne 2 ]; then
    echo "usage: sh deploy/container/rootfs.sh BINARY OUT_DIR" >&2
    exit 2
fi
bin=$1
out=$2
if [ ! -x "$bin" ]; then
    echo "rootfs.sh: $bin is not an executable; build it first (cargo build --release --bin geobeat)" >&2
    exit 2
fi
if [ -e "$out" ] && [ -n "$(ls -A "$out")" ]; then
    echo "rootfs.sh: $out is not empty; remove it or give another directory" >&2
    exit 2
fi

uid=10001
mkdir -p "$out/usr/local/bin" "$out/etc" "$out/var/lib/geobeat" "$out/proc" "$out/sys" \
    "$out/dev" "$out/tmp" "$out/etc/geobeat"
cp "$bin" "$out/usr/local/bin/geobeat"
chmod 0755 "$out/usr/local/bin/geobeat"
# The release profile keeps line tables for profiling (Cargo.toml); the image does not need them.
if command -v strip >/dev/null 2>&1; then
    strip --strip-debug "$out/usr/local/bin/geobeat"
else
    echo "rootfs.sh: no strip (binutils): the binary keeps its debug sections" >&2
fi

# Every library the dynamic loader resolves, at the same path, plus the loader itself.
ldd "$bin" | while read -r first second third _; do
    case "$second" in
        "=>") lib=$third ;;
        *) lib=$first ;;
    esac
    case "$lib" in
        /*)
            mkdir -p "$out$(dirname "$lib")"
            cp -L "$lib" "$out$lib"
            ;;
    esac
done
if [ ! -e "$out/lib64/ld-linux-x86-64.so.2" ] && [ ! -e "$out/lib/ld-linux-aarch64.so.1" ]; then
    echo "rootfs.sh: no dynamic loader found by ldd for $bin" >&2
    exit 1
fi

cat > "$out/etc/passwd" <<PASSWD
root:x:0:0:root:/root:/usr/sbin/nologin
geobeat:x:$uid:$uid:geobeat:/var/lib/geobeat:/usr/sbin/nologin
PASSWD
cat > "$out/etc/group" <<GROUP
root:x:0:
geobeat:x:$uid:
GROUP
# Name resolution for `localhost` and for sink hosts (files, then DNS; glibc >= 2.34 has both
# built in, no NSS modules to copy).
cat > "$out/etc/nsswitch.conf" <<NSS
hosts: files dns
NSS
cat > "$out/etc/hosts" <<HOSTS
127.0.0.1 localhost
::1 localhost
HOSTS
chmod 1777 "$out/tmp"
chmod 0700 "$out/var/lib/geobeat"
chown "$uid:$uid" "$out/var/lib/geobeat" 2>/dev/null || echo "rootfs.sh: not root: /var/lib/geobeat keeps your owner (the image build sets it)" >&2
