import fs from "node:fs/promises";
import path from "node:path";
import { FailedPreconditionError, InvalidArgumentError } from "@kiln/kit";
import { overlaps, parseCidr } from "./cidr.js";
import { EXISTS, GONE, inNetns, ip, netnsPath, run } from "./command.js";
import { createEgressPolicy, type EgressPolicy } from "./egress.js";
import type { AddressLayout } from "./pool.js";

/**
 * The router: one network namespace per host that every VM namespace is wired to, so that all
 * forwarding and filtering happens in a namespace Kiln owns. `net.ipv4.ip_forward` stays 0 on
 * the host and the host's firewall is never touched:
 *
 *   host ── <uplinkName> ═══ up0 ── [router netns: ip_forward=1, proxy_arp, rp_filter,
 *                                     KILN-* iptables chains, MASQUERADE]
 *                                      ├─ kv-<vm1> ═══ eth0 [VM netns kiln-<vm1>]
 *                                      └─ kv-<vm2> ═══ eth0 [VM netns kiln-<vm2>]
 *
 * The host reaches VM addresses through a route for the VM network via the router (the host is
 * an endpoint, it forwards nothing). Every `kv-*` carries the gateway address as a /32 and a /32
 * route to its VM; proxy ARP makes the router answer for every other address, so VMs talk only
 * to the router, never directly to each other. Outbound traffic leaves through the router's
 * default route (the host): reaching beyond the host additionally needs the operator to let
 * the host forward and masquerade for the uplink, or to move an uplink interface into the router
 * — Kiln does not change the host's forwarding itself.
 *
 * The router's sysfs is mounted at `<runDir>/sys`, so the sampler reads each `kv-*`'s counters
 * from a file without entering the namespace.
 */
export interface RouterOptions {
  layout: AddressLayout;
  /** Router namespace name (default `kiln-router`). */
  name?: string;
  /** Host end of the host↔router link, ≤ 15 chars (default `kiln-uplink`). */
  uplinkName?: string;
  /** Where the router's sysfs is mounted (default `/run/kiln/<name>`). */
  runDir?: string;
  /** Destinations VMs may never reach, on top of metadata, link-local and host addresses. */
  blockedCidrs?: readonly string[];
}

export interface Router {
  readonly name: string;
  readonly netnsPath: string;
  readonly uplinkName: string;
  /** The router's end of the host link, inside the router namespace. */
  readonly routerUplink: string;
  readonly layout: AddressLayout;
  /** Holds the router's sysfs mount (`<runDir>/sys`). */
  readonly runDir: string;
  /** `<sysfs>/class/net/<if>/statistics/` of interfaces in the router namespace. */
  statsDir(iface: string): string;
  /** Creates or repairs the router (idempotent; run at every start). */
  ensure(): Promise<void>;
  /** The egress policy (valid after ensure()). */
  egress(): EgressPolicy;
  /** Removes the router, its host link and route, and the sysfs mount. VMs must be detached first. */
  destroy(): Promise<void>;
  /** Interfaces in the router namespace (names), read from its sysfs. */
  interfaces(): Promise<string[]>;
  exists(): Promise<boolean>;
}

const ROUTER_UPLINK = "up0";

export function createRouter(opts: RouterOptions): Router {
  const name = opts.name ?? "kiln-router";
  const uplinkName = opts.uplinkName ?? "kiln-uplink";
  if (uplinkName.length > 15)
    throw new InvalidArgumentError(`uplink interface name ${uplinkName} is longer than 15 characters`);
  const runDir = opts.runDir ?? `/run/kiln/${name}`;
  const sysDir = path.join(runDir, "sys");
  const { layout } = opts;
  let policy: EgressPolicy | undefined;

  async function exists(): Promise<boolean> {
    return fs.access(netnsPath(name)).then(
      () => true,
      () => false,
    );
  }

  async function mounted(): Promise<boolean> {
    const info = await fs.readFile("/proc/self/mountinfo", "utf8");
    return info.split("\n").some((line) => line.split(" ")[4] === sysDir);
  }

  async function ensureSysfs(): Promise<void> {
    // A mount left from an earlier router namespace of the same name shows the wrong interfaces.
    const fresh = await fs.access(path.join(sysDir, "class/net", ROUTER_UPLINK)).then(
      () => true,
      () => false,
    );
    if (fresh) return;
    if (await mounted()) await run("umount", ["-l", sysDir], { tolerate: /not mounted/ });
    await fs.mkdir(sysDir, { recursive: true });
    // sysfs shows the network namespace of the process that mounts it; nsenter --net keeps the
    // host's mount namespace, so the mount is visible to metald.
    await inNetns(name, "mount", ["-t", "sysfs", `sysfs-${name}`, sysDir]);
  }

  async function hostAddresses(): Promise<string[]> {
    const out = await ip(undefined, ["-j", "-4", "addr", "show"]);
    const links = JSON.parse(out) as Array<{ addr_info?: Array<{ local?: string }> }>;
    return links
      .flatMap((l) => (l.addr_info ?? []).map((a) => a.local ?? ""))
      .filter((a) => a && !layout.cidr.contains(a));
  }

  /** A VM network that overlaps a network the host already routes would cut the host off from it. */
  async function refuseOverlap(): Promise<void> {
    const routes = JSON.parse(await ip(undefined, ["-j", "route", "show", "table", "main"])) as Array<{
      dst?: string;
      dev?: string;
    }>;
    for (const r of routes) {
      if (!r.dst || r.dst === "default" || r.dev === uplinkName) continue;
      const other = parseCidr(r.dst.includes("/") ? r.dst : `${r.dst}/32`, "host route", { anyLength: true });
      const a = layout.cidr;
      if (overlaps(a, other)) {
        throw new FailedPreconditionError(
          `VM network ${a.text} overlaps ${r.dst}, which this host already routes via ${r.dev ?? "?"}: configure another UNKEY_METALD_NETWORK_CIDR`,
        );
      }
    }
  }

  return {
    name,
    netnsPath: netnsPath(name),
    uplinkName,
    routerUplink: ROUTER_UPLINK,
    layout,
    runDir,
    exists,
    statsDir: (iface) => path.join(sysDir, "class/net", iface, "statistics"),
    egress() {
      if (!policy) throw new Error(`router ${name}: call ensure() before using its egress policy`);
      return policy;
    },
    async ensure() {
      const { uplink, cidr } = layout;
      await refuseOverlap();
      await ip(undefined, ["netns", "add", name], { tolerate: EXISTS });
      await ip(name, ["link", "set", "lo", "up"]);
      await inNetns(name, "sysctl", [
        "-q",
        "-w",
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.proxy_arp=1",
        "net.ipv4.conf.default.proxy_arp=1",
        "net.ipv4.conf.all.rp_filter=1",
        "net.ipv4.conf.default.rp_filter=1",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
      ]);
      await ip(
        undefined,
        ["link", "add", uplinkName, "type", "veth", "peer", "name", ROUTER_UPLINK, "netns", name],
        {
          tolerate: EXISTS,
        },
      );
      await ip(undefined, ["addr", "add", `${uplink.host}/${uplink.prefixLen}`, "dev", uplinkName], {
        tolerate: EXISTS,
      });
      await ip(undefined, ["link", "set", uplinkName, "up"]);
      await ip(name, ["addr", "add", `${uplink.router}/${uplink.prefixLen}`, "dev", ROUTER_UPLINK], {
        tolerate: EXISTS,
      });
      await ip(name, ["link", "set", ROUTER_UPLINK, "up"]);
      await ip(undefined, ["route", "replace", cidr.text, "via", uplink.router, "dev", uplinkName]);
      await ip(name, ["route", "replace", "default", "via", uplink.host, "dev", ROUTER_UPLINK]);
      // One policy object per router, so its changes stay serialised; host addresses are read
      // when it is first ensured (at metald start).
      policy ??= createEgressPolicy({
        netns: name,
        layout,
        uplinkInterface: ROUTER_UPLINK,
        hostAddresses: await hostAddresses(),
        blockedCidrs: opts.blockedCidrs,
      });
      await policy.install();
      await ensureSysfs();
    },
    async destroy() {
      if (await mounted()) await run("umount", ["-l", sysDir], { tolerate: /not mounted/ });
      // Only the directories this router made: never a recursive delete of a configured path.
      await fs.rmdir(sysDir).catch(() => undefined);
      await fs.rmdir(runDir).catch(() => undefined);
      await ip(undefined, ["route", "del", layout.cidr.text, "dev", uplinkName], { tolerate: GONE });
      // Deleting the namespace destroys every veth end inside it, and with them their peers.
      await ip(undefined, ["link", "del", uplinkName], { tolerate: GONE });
      await ip(undefined, ["netns", "del", name], { tolerate: GONE });
    },
    async interfaces() {
      return fs.readdir(path.join(sysDir, "class/net")).catch(() => []);
    },
  };
}
