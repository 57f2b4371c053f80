import dgram from "node:dgram";
import net from "node:net";
import {
  AlreadyExistsError,
  FailedPreconditionError,
  InvalidArgumentError,
  ResourceExhaustedError,
} from "@kiln/kit";
import type { Kysely } from "kysely";
import { type Ipv4Cidr, parseCidr } from "./cidr.js";

/**
 * Address and host-port pools. Allocations are rows with unique keys (`0001_vms`:
 * `ip_allocations(ip_address PK, vm_id UNIQUE)`, `port_allocations(host_port PK)`), so an address
 * or port can never be held by two VMs at once — across concurrent calls, several pool objects
 * and restarts. Allocation inserts with ON CONFLICT DO NOTHING and moves to the next free value
 * when another caller won the row. Rows reference `vms.vm_id`: the VM row must exist first.
 */
export interface NetworkTables {
  ip_allocations: { ip_address: string; vm_id: string; allocated_at: number };
  port_allocations: {
    host_port: number;
    vm_id: string;
    container_port: number;
    protocol: string;
    allocated_at: number;
  };
}

/**
 * Default VM network. 10.213.0.0/16 is private (RFC 1918) and clear of the ranges other tools
 * on a host pick by default (Docker 172.17/16, Podman 10.88/16, Kubernetes 10.96/12 and
 * 10.244/16, libvirt 192.168.122/24); link-local 169.254/16 is not an option because metadata
 * services live there and egress to it is always blocked. Override with UNKEY_METALD_NETWORK_CIDR.
 */
export const DEFAULT_NETWORK_CIDR = "10.213.0.0/16";
export const DEFAULT_PORT_RANGE = { first: 20000, last: 29999 } as const;

/**
 * How a pool CIDR is used: the first host address is every VM's gateway (the router answers on
 * it), the last /30 links the host to the router, and everything in between goes to VMs.
 */
export interface AddressLayout {
  cidr: Ipv4Cidr;
  gateway: string;
  prefixLen: number;
  /** Host side and router side of the host↔router link (a /30 at the end of the CIDR). */
  uplink: { host: string; router: string; prefixLen: 30 };
  /** Offsets (from the network address) handed to VMs, inclusive. */
  firstGuestOffset: number;
  lastGuestOffset: number;
}

export function addressLayout(cidrText: string): AddressLayout {
  const cidr = parseCidr(cidrText, "VM network CIDR");
  return {
    cidr,
    gateway: cidr.at(1),
    prefixLen: cidr.prefixLen,
    uplink: { host: cidr.at(cidr.size - 3), router: cidr.at(cidr.size - 2), prefixLen: 30 },
    firstGuestOffset: 2,
    lastGuestOffset: cidr.size - 5,
  };
}

export interface IpAllocation {
  ipAddress: string;
  vmId: string;
  allocatedAt: number;
}

export interface AddressPool {
  readonly layout: AddressLayout;
  /** The VM's address: its existing allocation, or the lowest free one. */
  allocate(vmId: string): Promise<string>;
  /** Frees the VM's address; no-op when it has none. */
  release(vmId: string): Promise<void>;
  addressOf(vmId: string): Promise<string | undefined>;
  allocations(): Promise<IpAllocation[]>;
}

export interface AddressPoolDeps<DB extends NetworkTables = NetworkTables> {
  /** metald's database (any schema that includes NetworkTables). */
  db: Kysely<DB>;
  /** e.g. `10.213.0.0/16` (DEFAULT_NETWORK_CIDR). */
  cidr: string;
  now?: () => number;
}

export function createAddressPool<DB extends NetworkTables>(deps: AddressPoolDeps<DB>): AddressPool {
  // Kysely's schema parameter is invariant; these queries only touch NetworkTables.
  const db = deps.db as unknown as Kysely<NetworkTables>;
  const now = deps.now ?? Date.now;
  const layout = addressLayout(deps.cidr);

  async function addressOf(vmId: string): Promise<string | undefined> {
    const row = await db
      .selectFrom("ip_allocations")
      .select("ip_address")
      .where("vm_id", "=", vmId)
      .executeTakeFirst();
    return row?.ip_address;
  }

  return {
    layout,
    addressOf,
    async allocate(vmId) {
      const existing = await addressOf(vmId);
      if (existing) return existing;
      const lost = new Set<string>();
      for (;;) {
        const taken = new Set(
          (await db.selectFrom("ip_allocations").select("ip_address").execute()).map((r) => r.ip_address),
        );
        let candidate: string | undefined;
        for (let off = layout.firstGuestOffset; off <= layout.lastGuestOffset; off++) {
          const ip = layout.cidr.at(off);
          if (!taken.has(ip) && !lost.has(ip)) {
            candidate = ip;
            break;
          }
        }
        if (!candidate) {
          throw new ResourceExhaustedError(
            `no free VM address left in ${layout.cidr.text} (${layout.lastGuestOffset - layout.firstGuestOffset + 1} addresses, all allocated): delete VMs or configure a larger UNKEY_METALD_NETWORK_CIDR`,
          );
        }
        const result = await db
          .insertInto("ip_allocations")
          .values({ ip_address: candidate, vm_id: vmId, allocated_at: now() })
          .onConflict((oc) => oc.doNothing())
          .executeTakeFirst();
        if (Number(result.numInsertedOrUpdatedRows ?? 0n) === 1) return candidate;
        // Either another caller took this address (try the next) or this VM got one concurrently.
        const mine = await addressOf(vmId);
        if (mine) return mine;
        lost.add(candidate);
      }
    },
    async release(vmId) {
      await db.deleteFrom("ip_allocations").where("vm_id", "=", vmId).execute();
    },
    async allocations() {
      const rows = await db.selectFrom("ip_allocations").selectAll().orderBy("ip_address").execute();
      return rows.map((r) => ({
        ipAddress: r.ip_address,
        vmId: r.vm_id,
        allocatedAt: Number(r.allocated_at),
      }));
    },
  };
}

export type PortProtocol = "tcp" | "udp";

/** Parses a host port range setting such as `20000-29999`; `setting` names it in errors. */
export function parsePortRange(text: string, setting = "host port range"): { first: number; last: number } {
  const m = /^\s*(\d{1,5})\s*-\s*(\d{1,5})\s*$/.exec(text);
  const first = Number(m?.[1]);
  const last = Number(m?.[2]);
  if (!m || first < 1 || last > 65535 || first > last) {
    throw new InvalidArgumentError(
      `${setting} ${JSON.stringify(text)} is invalid: use FIRST-LAST with 1 ≤ FIRST ≤ LAST ≤ 65535, e.g. 20000-29999`,
    );
  }
  return { first, last };
}

export interface PortAllocation {
  hostPort: number;
  vmId: string;
  containerPort: number;
  protocol: PortProtocol;
  allocatedAt: number;
}

export interface PortRequest {
  /** The port the workload listens on. */
  containerPort: number;
  /** Default "tcp". */
  protocol?: PortProtocol;
  /** A specific host port; 0 or unset = the lowest free port in the pool's range. */
  hostPort?: number;
}

export interface PortPool {
  readonly range: { first: number; last: number };
  /** A host port for one of the VM's ports; returns the existing allocation when called again. */
  allocate(vmId: string, request: PortRequest): Promise<PortAllocation>;
  /** Frees all of the VM's host ports. */
  release(vmId: string): Promise<void>;
  allocationsOf(vmId: string): Promise<PortAllocation[]>;
  allocations(): Promise<PortAllocation[]>;
}

export interface PortPoolDeps<DB extends NetworkTables = NetworkTables> {
  db: Kysely<DB>;
  /** Inclusive; default 20000–29999. */
  range?: { first: number; last: number };
  /** Whether nothing on the host holds the port; default: try to bind it on 0.0.0.0. */
  isFree?: (port: number, protocol: PortProtocol) => Promise<boolean>;
  now?: () => number;
}

export function createPortPool<DB extends NetworkTables>(deps: PortPoolDeps<DB>): PortPool {
  const db = deps.db as unknown as Kysely<NetworkTables>;
  const now = deps.now ?? Date.now;
  const range = deps.range ?? DEFAULT_PORT_RANGE;
  const isFree = deps.isFree ?? portIsFree;
  if (
    !Number.isInteger(range.first) ||
    !Number.isInteger(range.last) ||
    range.first < 1 ||
    range.last > 65535 ||
    range.first > range.last
  ) {
    throw new InvalidArgumentError(
      `host port range ${range.first}-${range.last} is invalid: use two ports 1–65535, first ≤ last`,
    );
  }

  const toAllocation = (r: NetworkTables["port_allocations"]): PortAllocation => ({
    hostPort: Number(r.host_port),
    vmId: r.vm_id,
    containerPort: Number(r.container_port),
    protocol: r.protocol === "udp" ? "udp" : "tcp",
    allocatedAt: Number(r.allocated_at),
  });

  async function allocationsOf(vmId: string): Promise<PortAllocation[]> {
    const rows = await db
      .selectFrom("port_allocations")
      .selectAll()
      .where("vm_id", "=", vmId)
      .orderBy("host_port")
      .execute();
    return rows.map(toAllocation);
  }

  async function tryInsert(
    vmId: string,
    hostPort: number,
    containerPort: number,
    protocol: PortProtocol,
  ): Promise<boolean> {
    const result = await db
      .insertInto("port_allocations")
      .values({
        host_port: hostPort,
        vm_id: vmId,
        container_port: containerPort,
        protocol,
        allocated_at: now(),
      })
      .onConflict((oc) => oc.doNothing())
      .executeTakeFirst();
    return Number(result.numInsertedOrUpdatedRows ?? 0n) === 1;
  }

  return {
    range,
    allocationsOf,
    async allocate(vmId, request) {
      const protocol = request.protocol ?? "tcp";
      const { containerPort } = request;
      const wanted = request.hostPort ?? 0;
      if (!Number.isInteger(containerPort) || containerPort < 1 || containerPort > 65535) {
        throw new InvalidArgumentError(`container port ${containerPort} is out of range: use 1–65535`, {
          field: "container_port",
        });
      }
      if (!Number.isInteger(wanted) || wanted < 0 || wanted > 65535) {
        throw new InvalidArgumentError(
          `host port ${wanted} is out of range: use 1–65535, or 0 to allocate one`,
          { field: "host_port" },
        );
      }
      const same = (await allocationsOf(vmId)).find(
        (a) => a.containerPort === containerPort && a.protocol === protocol,
      );
      if (same && (wanted === 0 || wanted === same.hostPort)) return same;

      if (wanted !== 0) {
        if (!(await isFree(wanted, protocol))) {
          throw new FailedPreconditionError(
            `host port ${wanted}/${protocol} is in use by another process on this host: choose another port, or 0 to allocate one`,
          );
        }
        if (await tryInsert(vmId, wanted, containerPort, protocol)) {
          return { hostPort: wanted, vmId, containerPort, protocol, allocatedAt: now() };
        }
        const holder = await db
          .selectFrom("port_allocations")
          .select("vm_id")
          .where("host_port", "=", wanted)
          .executeTakeFirst();
        throw new AlreadyExistsError(
          `host port ${wanted} is already forwarded to ${holder?.vm_id === vmId ? "another port of this VM" : "another VM"}: choose another port, or 0 to allocate one`,
        );
      }

      const skip = new Set<number>();
      for (;;) {
        const taken = new Set(
          (await db.selectFrom("port_allocations").select("host_port").execute()).map((r) =>
            Number(r.host_port),
          ),
        );
        let candidate: number | undefined;
        for (let p = range.first; p <= range.last; p++) {
          if (taken.has(p) || skip.has(p)) continue;
          if (!(await isFree(p, protocol))) {
            skip.add(p);
            continue;
          }
          candidate = p;
          break;
        }
        if (candidate === undefined) {
          throw new ResourceExhaustedError(
            `no free host port left in ${range.first}-${range.last}: delete VMs, free ports on the host, or widen the host port range`,
          );
        }
        if (await tryInsert(vmId, candidate, containerPort, protocol)) {
          return { hostPort: candidate, vmId, containerPort, protocol, allocatedAt: now() };
        }
        skip.add(candidate);
      }
    },
    async release(vmId) {
      await db.deleteFrom("port_allocations").where("vm_id", "=", vmId).execute();
    },
    async allocations() {
      const rows = await db.selectFrom("port_allocations").selectAll().orderBy("host_port").execute();
      return rows.map(toAllocation);
    },
  };
}

/**
 * True when the port can be bound on every address (0.0.0.0) — so neither 127.0.0.1 nor the
 * host's bind address is taken by something else. The probe socket is closed at once.
 */
export function portIsFree(port: number, protocol: PortProtocol): Promise<boolean> {
  return new Promise((resolve) => {
    if (protocol === "udp") {
      const sock = dgram.createSocket("udp4");
      sock.once("error", () => {
        sock.close();
        resolve(false);
      });
      sock.bind({ port, address: "0.0.0.0", exclusive: true }, () => sock.close(() => resolve(true)));
      return;
    }
    const server = net.createServer();
    server.once("error", () => resolve(false));
    server.listen({ port, host: "0.0.0.0", exclusive: true }, () => server.close(() => resolve(true)));
  });
}
