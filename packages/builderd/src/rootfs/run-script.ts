import { InvalidArgumentError } from "@kiln/kit";

/** The workload as the image config and the request's overrides define it. */
export interface WorkloadSpec {
  entrypoint: string[];
  cmd: string[];
  env: Record<string, string>;
  workingDir: string;
  /** Numeric `uid[:gid]` or empty (root) here; injectInit resolves names through the image first. */
  user: string;
}

const FIELD = "config.target.microvm_rootfs.runtime_config";

/** Where the init and its tools live inside the rootfs. */
export const KILN_DIR = "/.kiln";

/**
 * Quotes one argument for a POSIX shell so it reaches the program byte for byte: single quotes,
 * with each embedded `'` written as `'\''`. Plain words stay bare for readability.
 */
export function shellQuote(arg: string): string {
  if (arg.includes("\0")) throw new Error("a NUL byte cannot be passed in an argument");
  if (/^[A-Za-z0-9_@%+:,./-]+$/.test(arg)) return arg;
  return `'${arg.replaceAll("'", `'\\''`)}'`;
}

/** Docker's rule: entrypoint + cmd; cmd alone without an entrypoint; nothing to run is an error. */
export function workloadArgv(spec: Pick<WorkloadSpec, "entrypoint" | "cmd">): string[] {
  const argv = [...spec.entrypoint, ...spec.cmd];
  if (argv.length === 0) {
    throw new InvalidArgumentError(
      "the image has neither an entrypoint nor a cmd: set runtime_config.entrypoint or runtime_config.command",
      { field: `${FIELD}.command` },
    );
  }
  if (argv[0] === "") {
    throw new InvalidArgumentError("the program to run (the first word of entrypoint + cmd) is empty", {
      field: `${FIELD}.entrypoint`,
    });
  }
  argv.forEach((a, i) => {
    if (a.includes("\0")) {
      throw new InvalidArgumentError(`argument ${i} of entrypoint + cmd contains a NUL byte`, {
        field: `${FIELD}.command`,
      });
    }
  });
  return argv;
}

/**
 * Renders /.kiln/init, the VM's init (a busybox sh script). It runs in two stages.
 *
 * Stage 1, as PID 1:
 *  1. mounts /proc, /sys, /dev (devtmpfs), /dev/pts, /dev/shm and /run unless already mounted (the
 *     initramfs hands over /proc, /sys and /dev), and a tmpfs /tmp when the image has no /tmp;
 *  2. reads the kernel command line: `kiln.hostname=`, `kiln.ip=ADDR/PREFIX`, `kiln.gw=`,
 *     `kiln.dns=IP[,IP…]` (resolv.conf is written only when given); the last of a repeated key wins;
 *  3. sets the hostname (and writes /etc/hosts if the image has none), brings up lo and eth0;
 *  4. execs `tini -g` as PID 1 with this script as its child: tini reaps orphans and forwards
 *     every signal PID 1 gets (TERM from a stop, INT from Ctrl-Alt-Del) to stage 2's process group.
 *
 * Stage 2, tini's child: runs the workload in the foreground, then powers the VM off.
 *  - `env -i` with exactly the spec's variables, in its working directory (created if missing, as
 *    Docker does), as its user (busybox `nsenter -S uid -G gid`, which also clears supplementary
 *    groups), under `tini -s`, which execs entrypoint + cmd with a real PATH lookup (a busybox
 *    exec would run its own applet instead of the image's program of that name) and forwards the
 *    signals to it. In the foreground, not with `&`: a shell starts background jobs with INT and
 *    QUIT ignored, and an ignored signal stays ignored across exec.
 *  - prints "kiln-init: workload exited with status N", syncs and powers off (`poweroff -f`; then
 *    `reboot -f`, which QEMU's -no-reboot turns into an exit; if both fail the script exits, tini
 *    as PID 1 exits and `panic=-1` ends the VM).
 * Messages go to the console (ttyS0) prefixed "kiln-init:".
 */
export function renderInitScript(spec: WorkloadSpec): string {
  const argv = workloadArgv(spec);
  const user = numericUser(spec.user);
  if (!spec.workingDir.startsWith("/") || spec.workingDir.includes("\0")) {
    throw new InvalidArgumentError(
      `working directory ${JSON.stringify(spec.workingDir)} must be an absolute path`,
      {
        field: `${FIELD}.working_dir`,
      },
    );
  }
  const envWords = Object.entries(spec.env).map(([k, v]) => {
    if (k === "" || k.includes("=") || k.includes("\0") || v.includes("\0")) {
      throw new InvalidArgumentError(
        `environment variable ${JSON.stringify(k)} is invalid: names must be non-empty without "=" and nothing may contain NUL`,
        { field: `${FIELD}.environment` },
      );
    }
    return shellQuote(`${k}=${v}`);
  });
  const switchUser =
    user.uid === 0 && user.gid === 0
      ? []
      : ["$bb", "nsenter", "-S", String(user.uid), "-G", String(user.gid), "-F", "--"];
  const launch = [
    "exec",
    "$bb",
    "env",
    "-i",
    "--",
    ...envWords,
    ...switchUser,
    `${KILN_DIR}/tini`,
    "-s",
    "--",
    ...argv.map(shellQuote),
  ];
  const wd = shellQuote(spec.workingDir);

  return `#!${KILN_DIR}/busybox sh
# Kiln VM init: generated at build time (builderd rootfs/run-script.ts); the workload is described
# in ${KILN_DIR}/workload.json. Stage 1 runs as PID 1, stage 2 as the child of tini.
bb=${KILN_DIR}/busybox

log() { echo "kiln-init: $*"; }

if [ "$$" = 1 ]; then
  mounted() { $bb awk -v m="$1" '$2 == m { found = 1 } END { exit !found }' /proc/mounts 2>/dev/null; }
  mnt() {
    mounted "$2" && return 0
    [ -d "$2" ] || $bb mkdir -p "$2" || { log "cannot create mount point $2"; return 1; }
    $bb mount -t "$1" -o "$3" "$1" "$2" || log "mounting $1 on $2 failed"
  }
  mnt proc /proc nosuid,nodev,noexec
  mnt sysfs /sys nosuid,nodev,noexec
  mnt devtmpfs /dev nosuid,mode=0755
  mnt devpts /dev/pts nosuid,noexec,newinstance,ptmxmode=0666,mode=0620
  mnt tmpfs /dev/shm nosuid,nodev,mode=1777
  mnt tmpfs /run nosuid,nodev,mode=0755
  if [ ! -e /tmp ] && [ ! -L /tmp ]; then mnt tmpfs /tmp nosuid,nodev,mode=1777; fi
  for l in fd:/proc/self/fd stdin:/proc/self/fd/0 stdout:/proc/self/fd/1 stderr:/proc/self/fd/2; do
    [ -e "/dev/\${l%%:*}" ] || [ -L "/dev/\${l%%:*}" ] || $bb ln -s "\${l#*:}" "/dev/\${l%%:*}"
  done

  set -f
  hostname= ip= gw= dns=
  for arg in $($bb cat /proc/cmdline 2>/dev/null); do
    case "$arg" in
      kiln.hostname=*) hostname=\${arg#kiln.hostname=} ;;
      kiln.ip=*) ip=\${arg#kiln.ip=} ;;
      kiln.gw=*) gw=\${arg#kiln.gw=} ;;
      kiln.dns=*) dns=\${arg#kiln.dns=} ;;
    esac
  done
  set +f

  if [ -n "$hostname" ]; then
    $bb hostname "$hostname" || log "setting the hostname to $hostname failed"
  fi
  if [ -d /etc ] && [ ! -e /etc/hosts ] && [ ! -L /etc/hosts ]; then
    { printf '127.0.0.1\\tlocalhost %s\\n::1\\tlocalhost %s\\n' "$hostname" "$hostname" >/etc/hosts; } 2>/dev/null
  fi
  $bb ip link set lo up || log "bringing up lo failed"
  if [ -n "$ip" ]; then
    { $bb ip link set eth0 up && $bb ip addr add "$ip" dev eth0; } || log "configuring eth0 with $ip failed"
    if [ -n "$gw" ]; then $bb ip route add default via "$gw" dev eth0 || log "adding the default route via $gw failed"; fi
  fi
  if [ -n "$dns" ]; then
    $bb mkdir -p /etc && $bb rm -f /etc/resolv.conf
    for ns in $(echo "$dns" | $bb tr ',' ' '); do echo "nameserver $ns"; done >/etc/resolv.conf
  fi

  exec ${KILN_DIR}/tini -g -- $bb sh ${KILN_DIR}/init
  log "cannot start ${KILN_DIR}/tini"
  exit 1
fi

# Stage 2. Handlers (not ignores) so signals tini forwards to this group do not end this script;
# the workload starts with default dispositions.
for sig in TERM INT HUP QUIT USR1 USR2; do trap : "$sig"; done
(
  cd ${wd} 2>/dev/null || { $bb mkdir -p ${wd} && cd ${wd}; } || { log cannot enter the working directory ${wd}; exit 126; }
  ${launch.join(" ")}
)
status=$?
log "workload exited with status $status"
$bb sync
$bb poweroff -f
$bb reboot -f
exit "$status"
`;
}

/** "" → root; "uid" → uid:0; "uid:gid" as given. Names must be resolved first (see user.ts). */
function numericUser(user: string): { uid: number; gid: number } {
  if (user === "" || user === "root" || user === "0") return { uid: 0, gid: 0 };
  const m = /^(\d{1,10})(?::(\d{1,10}))?$/.exec(user);
  if (!m) {
    throw new InvalidArgumentError(
      `user ${JSON.stringify(user)} must be a numeric uid[:gid] here; resolve names through the image's /etc/passwd first`,
      { field: `${FIELD}.user` },
    );
  }
  return { uid: Number(m[1]), gid: Number(m[2] ?? 0) };
}
