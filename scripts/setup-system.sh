#!/usr/bin/env bash
# Installs the Debian packages Kiln's runtimes and tests use. Idempotent: packages already
# present are skipped, and nothing is done at all when everything is there.
# Usage: scripts/setup-system.sh [--check]   (--check: only report what is missing, exit 1 if any)
set -euo pipefail

# package → why Kiln needs it
declare -A WHY=(
  [qemu-system-x86]="QEMU microvm backend (metald)"
  [qemu-utils]="qemu-img: per-VM copy-on-write overlays over the shared rootfs (metald)"
  [linux-image-cloud-amd64]="guest kernel for the QEMU backend (kiln assets import-kernel)"
  [runsc]="gVisor backend (metald)"
  [runc]="runc backend (metald)"
  [e2fsprogs]="mkfs.ext4 -d for builderd's ext4Writer=mkfs; e2fsck and debugfs check Kiln's own ext4 images in tests"
  [libeatmydata1]="lets mkfs.ext4 (ext4Writer=mkfs) skip its own fsyncs; the image is flushed once, while it is hashed"
  [busybox-static]="static busybox injected as the VM init's shell and used for the initramfs"
  [tini]="tini-static, the VM init's PID 1 reaper"
  [docker-registry]="a real OCI registry for pull tests"
  [skopeo]="copies fixture images into the test registry; benchmark peer"
  [umoci]="reference unpacker for extraction conformance tests; benchmark peer"
  [apache2-utils]="htpasswd -B for the registry auth tests"
  [iproute2]="network namespaces and veth pairs (metald)"
  [iptables]="port forwarding and egress rules in Kiln's own chains (metald)"
  [ca-certificates]="TLS to registries"
  [attr]="getfattr: tests read back the extended attributes of images Kiln's ext4 writer makes"
  [libcap2-bin]="getcap: tests check file capabilities in those images as the kernel reads them"
  [g++]="node-gyp compiles the native npm addons: better-sqlite3, zstd-napi (libzstd for zstd layers)"
  [make]="node-gyp builds the native addons with make"
  [python3]="node-gyp itself"
)
ORDER=(qemu-system-x86 qemu-utils linux-image-cloud-amd64 runsc runc e2fsprogs libeatmydata1 busybox-static tini docker-registry skopeo umoci apache2-utils iproute2 iptables ca-certificates attr libcap2-bin g++ make python3)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for p in "${ORDER[@]}"; do installed "$p" || missing+=("$p"); done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup-system: all ${#ORDER[@]} system packages present"
  exit 0
fi

echo "setup-system: installing ${#missing[@]} missing package(s):"
for p in "${missing[@]}"; do printf '  %-26s %s\n' "$p" "${WHY[$p]}"; done
if [ "${1:-}" = "--check" ]; then exit 1; fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup-system: not root and no sudo; install the packages above by hand" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# Another apt may hold the lock (unattended upgrades); wait for it rather than fail.
APT=(apt-get -y -q -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confold)
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
  $SUDO "${APT[@]}" update
fi
$SUDO "${APT[@]}" install --no-install-recommends "${missing[@]}"
echo "setup-system: done"
