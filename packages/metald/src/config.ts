import { bool, type ConfigSpec, duration, int, list, oneOf, str } from "@kiln/kit";

/** metald's own settings (`UNKEY_METALD_*`), next to the common ones every service has. */
export const settings = {
  backend: oneOf(["auto", "qemu", "firecracker", "gvisor", "runc"], {
    default: "auto",
    doc: "Backend for VMs that do not name one. auto: the strongest that works on this host (firecracker > qemu with KVM > gvisor > qemu under TCG > runc); `kiln vms backends` shows which work.",
  }),
  vmRoot: str({
    default: "",
    pattern: /^$|^\//,
    form: "an absolute directory or empty",
    doc: "Directory holding one directory per VM (assets, writable layer, console log). Empty: <data dir>/vms. Must be assetmanagerd's VM root too (its PrepareAssets places assets there).",
  }),
  networkCidr: str({
    default: "10.213.0.0/16",
    pattern: /^\d+\.\d+\.\d+\.\d+\/\d+$/,
    form: "an IPv4 CIDR such as 10.213.0.0/16",
    doc: "Addresses VMs get (one each, never two VMs at once). Must not overlap a network the host routes.",
  }),
  routerName: str({
    default: "kiln-router",
    pattern: /^[a-z][a-z0-9-]{0,10}$/,
    form: "1-11 characters [a-z0-9-], starting with a letter",
    doc: "Name of the network namespace all VM namespaces are wired to (its host-side veth is <name>-up). Two metalds on one host need different names and CIDRs.",
  }),
  portRange: str({
    default: "20000-29999",
    pattern: /^\d+-\d+$/,
    form: "FIRST-LAST host ports",
    doc: "Host ports forwarded to VMs' exposed ports are taken from this range.",
  }),
  bindAddress: str({
    default: "127.0.0.1",
    doc: "Address forwarded VM ports listen on besides 127.0.0.1 (0.0.0.0: every address). Endpoints report it.",
  }),
  egressBlockedCidrs: list({
    default: [],
    form: "a comma-separated list of CIDRs",
    doc: "Destinations VMs may never reach, on top of the built-in ones (metadata 169.254.0.0/16, the host's own addresses, the VM network).",
  }),
  netnsPoolSize: int({
    default: 4,
    min: 0,
    max: 256,
    doc: "VM network namespaces (with their veth pair to the router) kept made ahead of time, so CreateVm only configures one: about 10 ms less per VM. 0: make each one in CreateVm.",
  }),
  imageMountLinger: duration({
    default: 60_000,
    doc: "How long a container VM's base image stays mounted after the last VM using it is deleted, so the next VM of the image skips the loop mount (0: unmount at once).",
  }),
  shutdownGrace: duration({
    default: 30_000,
    doc: "How long ShutdownVm waits for a graceful stop (Ctrl-Alt-Del / SIGTERM) before forcing it, unless the request says otherwise.",
  }),
  billagedEnabled: bool({
    default: false,
    doc: "Hand VM starts/stops, the 100 ms usage samples (batched) and heartbeats to billaged (UNKEY_METALD_BILLAGED_URL). Off until billaged's RPCs exist (they answer unimplemented today).",
  }),
  usageBatchInterval: duration({
    default: 1_000,
    doc: "How often buffered usage samples are sent to billaged, one batch per VM.",
  }),
  consoleLogMaxBytes: int({
    default: 4 * 1024 * 1024,
    min: 64 * 1024,
    doc: "A VM's console log is trimmed to its newest half when it grows past this many bytes.",
  }),
} satisfies ConfigSpec;
