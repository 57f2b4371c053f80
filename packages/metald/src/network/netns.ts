import fs from "node:fs/promises";
import { pathExists, settleAll } from "@kiln/kit";
import { EXISTS, GONE, ip, ipBatch, NetworkCommandError, netnsPath } from "./command.js";
import { EGRESS_GROUP } from "./egress.js";
import type { VmNetworkNames } from "./names.js";
import type { Router } from "./router.js";

/**
 * One VM's network namespace, wired to the router by a veth pair (`kv-<short>` in the router,
 * `eth0` in the VM namespace). Two modes:
 *
 * - `address`: the namespace itself is the VM's network stack (runc, gVisor `--network=host`
 *   inside the namespace): eth0 carries the VM address and MAC, with a default route via the
 *   gateway.
 * - `tap`: a guest kernel brings its own stack (QEMU): eth0 and a tap device are joined by a
 *   bridge inside the namespace (layer 2, nothing to forward) and carry no address; the guest
 *   configures the address, MAC and gateway itself and QEMU opens the tap with
 *   `-netdev tap,ifname=tap0,script=no,downscript=no` from inside the namespace.
 *
 * Every step tolerates "already there", so creating again repairs a half-made namespace and
 * re-adopting a running VM after a restart changes nothing.
 */
export type AttachMode = "address" | "tap";

export interface VmNamespaceSpec {
  names: VmNetworkNames;
  guestIp: string;
  macAddress: string;
  mode: AttachMode;
  /** Whether the VM may connect out (egress.ts: its router interface's device group). */
  egressAllowed: boolean;
}

/** Whether the VM's namespace exists (pinned under /var/run/netns); starts no process. */
export function vmNamespaceExists(names: VmNetworkNames): Promise<boolean> {
  return pathExists(netnsPath(names.netns));
}

/**
 * How far a VM's namespace already exists: `absent` (see vmNamespaceExists), `pooled` (made
 * ahead of time by prepareVmNamespace and not used by anything since), or `exists` (possibly
 * half-made by a crash, or a running VM's: checked and repaired).
 */
export type NamespaceState = "absent" | "pooled" | "exists";

/**
 * Creates the VM's namespace, or finishes a pooled one, or repairs a half-made one. A new
 * namespace takes two steps of `ip` processes (each ~5 ms, and CreateVm waits for them): one
 * makes the namespace and the veth pair with each end already in its namespace, then both sides
 * are configured at once. A pooled one only needs the second step. An existing one is checked
 * and repaired step by step.
 */
export async function createVmNamespace(
  router: Router,
  spec: VmNamespaceSpec,
  state: NamespaceState,
): Promise<void> {
  const { names } = spec;
  const repair = async () => {
    await repairVmNamespace(router, spec);
    await ipBatch(router.name, routerSide(router, spec));
  };
  if (state === "exists") return repair();
  if (state === "absent") {
    try {
      await makeNamespaceAndLink(router, names);
    } catch (err) {
      // Made meanwhile (a concurrent attach of the same VM): repair instead.
      if (err instanceof NetworkCommandError && EXISTS.test(err.stderr)) return repair();
      throw err;
    }
  }
  await settleAll([
    ipBatch(names.netns, [["link", "set", "lo", "up"], ...guestSide(router, spec)]),
    ipBatch(router.name, routerSide(router, spec)),
  ]);
}

/**
 * The part of a VM's namespace that does not depend on the VM: the namespace, its veth pair to
 * the router, and the router's end up and answering. A pool makes these ahead of time, so
 * CreateVm only runs createVmNamespace's second step. The router end is outside the egress
 * group and has no route, so nothing behind it gets anywhere until a VM's address and policy are set.
 */
export async function prepareVmNamespace(router: Router, names: VmNetworkNames): Promise<void> {
  await makeNamespaceAndLink(router, names);
  await settleAll([
    ip(names.netns, ["link", "set", "lo", "up"]),
    ipBatch(router.name, routerLink(router, names)),
  ]);
}

function makeNamespaceAndLink(router: Router, names: VmNetworkNames): Promise<string> {
  return ipBatch(undefined, [
    ["netns", "add", names.netns],
    // Both ends are named into their namespaces: no process has to run inside either.
    [
      "link",
      "add",
      "name",
      names.guestVeth,
      "netns",
      names.netns,
      "type",
      "veth",
      "peer",
      "name",
      names.hostVeth,
      "netns",
      router.name,
    ],
  ]);
}

async function repairVmNamespace(router: Router, spec: VmNamespaceSpec): Promise<void> {
  const { names, mode } = spec;
  const vm = names.netns;
  await ip(vm, ["link", "set", "lo", "up"]);
  const hasGuestEnd = await ip(vm, ["link", "show", names.guestVeth], { tolerate: GONE });
  if (!hasGuestEnd.trim()) {
    // A router end without its VM end (the VM namespace was lost) cannot be reused.
    await ip(router.name, ["link", "del", names.hostVeth], { tolerate: GONE });
    await ip(router.name, [
      "link",
      "add",
      names.hostVeth,
      "type",
      "veth",
      "peer",
      "name",
      names.guestVeth,
      "netns",
      vm,
    ]);
  }
  if (mode === "tap") {
    await ip(vm, ["link", "add", names.bridge, "type", "bridge"], { tolerate: EXISTS });
    await ip(vm, ["tuntap", "add", "dev", names.tap, "mode", "tap"], {
      tolerate: /File exists|Device or resource busy/,
    });
  }
  await ipBatch(vm, guestSide(router, spec, { devicesExist: true }));
}

/**
 * The VM namespace's side, as idempotent `ip` lines (replace/set/change), run in that namespace.
 * Tap mode adds the bridge and tap device unless they exist (`add` is not idempotent).
 */
function guestSide(router: Router, spec: VmNamespaceSpec, opts: { devicesExist?: boolean } = {}): string[][] {
  const { names, guestIp } = spec;
  if (spec.mode === "address") {
    return [
      ["link", "set", names.guestVeth, "address", spec.macAddress],
      ["addr", "replace", `${guestIp}/${router.layout.prefixLen}`, "dev", names.guestVeth],
      ["link", "set", names.guestVeth, "up"],
      ["route", "replace", "default", "via", router.layout.gateway, "dev", names.guestVeth],
    ];
  }
  return [
    ...(opts.devicesExist
      ? []
      : [
          ["link", "add", names.bridge, "type", "bridge"],
          ["tuntap", "add", "dev", names.tap, "mode", "tap"],
        ]),
    ["link", "set", names.guestVeth, "master", names.bridge],
    ["link", "set", names.tap, "master", names.bridge],
    ...[names.guestVeth, names.tap, names.bridge].map((dev) => ["link", "set", dev, "up"]),
  ];
}

/** The router's side of the VM's link: idempotent lines run in the router namespace. */
function routerSide(router: Router, spec: VmNamespaceSpec): string[][] {
  const group = spec.egressAllowed ? EGRESS_GROUP : 0;
  return [
    ["link", "set", spec.names.hostVeth, "group", String(group)],
    ...routerLink(router, spec.names),
    ["route", "replace", `${spec.guestIp}/32`, "dev", spec.names.hostVeth],
  ];
}

/** The router's end of a VM link, up and answering, before any address is routed to it. */
function routerLink(router: Router, names: VmNetworkNames): string[][] {
  const { hostVeth } = names;
  return [
    ["addr", "replace", `${router.layout.gateway}/32`, "dev", hostVeth],
    ["link", "set", hostVeth, "up"],
    // Answer the VM's proxy ARP at once: the kernel's default waits a random 0-0.8 s, which the
    // VM's first reply to the host (inside its /16, behind the router) would sit out.
    ["ntable", "change", "name", "arp_cache", "dev", hostVeth, "proxy_delay", "0"],
  ];
}

/** Removes the VM's veth pair and namespace; idempotent. Processes still inside keep it alive, unnamed. */
export async function deleteVmNamespace(router: Router, names: VmNetworkNames): Promise<void> {
  // Deleting one end of a veth pair deletes both, and the VM's /32 route with it.
  await ip(router.name, ["link", "del", names.hostVeth], { tolerate: GONE });
  await ip(undefined, ["netns", "del", names.netns], { tolerate: GONE });
}

/** Named namespaces starting with `prefix` (leak checks); reads /var/run/netns, starts no process. */
export async function listNamespaces(prefix: string): Promise<string[]> {
  const dir = netnsPath("");
  const entries = await fs.readdir(dir).catch(() => [] as string[]);
  return entries.filter((e) => e.startsWith(prefix)).sort();
}
