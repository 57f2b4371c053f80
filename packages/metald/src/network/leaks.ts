import type { CgroupManager } from "../cgroups/cgroup.js";
import { listNamespaces } from "./netns.js";
import type { AddressPool, PortPool } from "./pool.js";
import type { PortForwarder } from "./port-forward.js";
import type { Router } from "./router.js";

/**
 * Everything Kiln creates per VM on a host, listed for leak checks: after a delete, or after
 * crash recovery, each list holds only the VMs that still exist. Reads directories and the
 * database; creates nothing. (A VM's egress is its router interface's device group: it goes
 * with the interface, so there is no per-VM firewall rule to leak.)
 */
export interface KilnResources {
  /** Named VM namespaces (`<prefix>…`), the router's excluded. */
  netns: string[];
  /** VM interfaces (`kv-*`) in the router namespace. */
  routerInterfaces: string[];
  /** VM cgroups (`<root>/<tenant>/<vm>`). */
  cgroups: string[];
  /** Active port forwards (`<vm>:<hostPort>/<protocol>`). */
  forwards: string[];
  /** Address allocations (`<vm>=<ip>`). */
  addresses: string[];
  /** Host port allocations (`<vm>=<port>/<protocol>`). */
  ports: string[];
}

export interface LeakSources {
  netnsPrefix: string;
  router?: Router;
  cgroups?: CgroupManager;
  forwarder?: PortForwarder;
  addressPool?: AddressPool;
  portPool?: PortPool;
  /** Namespaces made ahead of time, not a VM's yet (NetworkAttacher.pooled): not leaks. */
  pooled?: () => string[];
}

export async function listKilnResources(src: LeakSources): Promise<KilnResources> {
  const router = src.router && (await src.router.exists()) ? src.router : undefined;
  const pooled = new Set(src.pooled?.() ?? []);
  const pooledLinks = new Set([...pooled].map((n) => `kv-${n.slice(src.netnsPrefix.length)}`));
  return {
    netns: (await listNamespaces(src.netnsPrefix)).filter((n) => n !== src.router?.name && !pooled.has(n)),
    routerInterfaces: router
      ? (await router.interfaces()).filter((i) => i.startsWith("kv-") && !pooledLinks.has(i)).sort()
      : [],
    cgroups: src.cgroups ? (await src.cgroups.list()).map((c) => c.relativePath) : [],
    forwards: src.forwarder ? src.forwarder.list().map((f) => `${f.vmId}:${f.hostPort}/${f.protocol}`) : [],
    addresses: src.addressPool
      ? (await src.addressPool.allocations()).map((a) => `${a.vmId}=${a.ipAddress}`)
      : [],
    ports: src.portPool
      ? (await src.portPool.allocations()).map((p) => `${p.vmId}=${p.hostPort}/${p.protocol}`)
      : [],
  };
}

/** Total number of resources listed (0 = nothing leaked). */
export function countResources(r: KilnResources): number {
  return Object.values(r).reduce((n, list: string[]) => n + list.length, 0);
}
