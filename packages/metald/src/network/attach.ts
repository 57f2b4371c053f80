import { newId } from "@kiln/kit";
import { netnsPath } from "./command.js";
import { macAddress, vmNetworkNames } from "./names.js";
import { type AttachMode, createVmNamespace, deleteVmNamespace, vmNamespaceExists } from "./netns.js";
import type { NamespacePool } from "./netns-pool.js";
import type { AddressPool } from "./pool.js";
import type { Router } from "./router.js";

/**
 * A VM's place on the host network: address from the pool, namespace wired to the router, and
 * egress policy. The first seven fields are exactly the backends' `VmSpec.network`.
 */
export interface VmNetwork {
  netnsPath: string;
  guestIp: string;
  prefixLen: number;
  gateway: string;
  dns?: string;
  macAddress: string;
  /** Tap mode: the tap device inside the namespace for QEMU's `-netdev tap,ifname=…`. */
  tapName?: string;
  netnsName: string;
  /** The router-side interface (its counters are the VM's traffic, mirrored). */
  hostInterface: string;
  /** Directory with the host interface's rx_bytes / tx_bytes, for the sampler. */
  statsDir: string;
  mode: AttachMode;
}

export interface AttachVm {
  vmId: string;
  /** From the tenant's tier (TenantLimits.egressAllowed); metadata and host addresses stay blocked regardless. */
  egressAllowed: boolean;
}

export interface NetworkAttacher {
  /** A new VM id; with a namespace pool, one whose namespace is already made when one is ready. */
  newVmId(): string;
  /** Starts the namespace pool, if any (after the router is ensured; `vmIds`: the existing VMs). */
  start(vmIds: readonly string[]): Promise<void>;
  /** Stops the namespace pool and removes its unused namespaces. */
  stop(): Promise<void>;
  /** Namespaces made ahead of time and not used yet (leak checks leave them out). */
  pooled(): string[];
  /**
   * The VM's network without touching the host: allocates its address (or reuses its
   * allocation) and names its objects, so the rest of a VM can be prepared while `wire` runs.
   */
  plan(vm: AttachVm, opts: { mode: AttachMode }): Promise<VmNetwork>;
  /** Creates or repairs the planned namespace and applies the egress policy. Idempotent. */
  wire(vm: AttachVm, network: VmNetwork): Promise<void>;
  /**
   * Allocates the VM's address (or reuses its allocation), creates or repairs its namespace and
   * applies its egress policy. Idempotent: re-attaching a running VM after a restart changes
   * nothing. The router must be ensured first.
   */
  attach(vm: AttachVm, opts: { mode: AttachMode }): Promise<VmNetwork>;
  /** Removes the namespace and veth pair (and with it the egress), and releases the address. Idempotent. */
  detach(vmId: string): Promise<void>;
  /** Changes a VM's egress (tier change). */
  setEgress(vmId: string, allowed: boolean): Promise<void>;
}

export interface NetworkAttacherDeps {
  router: Router;
  pool: AddressPool;
  /** Prefix of VM namespace names (default `kiln-`): namespaces are `<prefix><short id>`. */
  netnsPrefix?: string;
  /** Resolver handed to guests, if the operator provides one reachable from VMs. */
  dns?: string;
  /** Namespaces made ahead of time (see netns-pool.ts), with the same prefix and router. */
  namespaces?: NamespacePool;
}

export const DEFAULT_NETNS_PREFIX = "kiln-";

export function createNetworkAttacher(deps: NetworkAttacherDeps): NetworkAttacher {
  const { router, pool } = deps;
  if (pool.layout.cidr.text !== router.layout.cidr.text) {
    throw new Error(
      `address pool ${pool.layout.cidr.text} and router ${router.layout.cidr.text} must use the same VM network CIDR`,
    );
  }
  const prefix = deps.netnsPrefix ?? DEFAULT_NETNS_PREFIX;
  const namesOf = (vmId: string) => vmNetworkNames(vmId, prefix);

  const namespaces = deps.namespaces;
  if (namespaces && (namespaces.netnsPrefix !== prefix || namespaces.router !== router)) {
    throw new Error("the namespace pool must use the attacher's router and namespace prefix");
  }
  return {
    plan,
    wire,
    newVmId: () => newId("vm", namespaces?.take()),
    async start(vmIds) {
      await namespaces?.start(new Set(vmIds.map((id) => namesOf(id).short)));
    },
    async stop() {
      await namespaces?.stop();
    },
    pooled: () => (namespaces?.idle() ?? []).map((short) => `${prefix}${short}`),
    async attach(vm, opts) {
      const network = await plan(vm, opts);
      await wire(vm, network);
      return network;
    },
    async detach(vmId) {
      const names = namesOf(vmId);
      // A pooled namespace whose VM failed before wiring it is the VM's to remove too.
      namespaces?.claim(names.short);
      await deleteVmNamespace(router, names);
      await pool.release(vmId);
    },
    async setEgress(vmId, allowed) {
      await router.egress().setAllowed(namesOf(vmId).hostVeth, allowed);
    },
  };

  async function plan(vm: AttachVm, { mode }: { mode: AttachMode }): Promise<VmNetwork> {
    const names = namesOf(vm.vmId);
    const guestIp = await pool.allocate(vm.vmId);
    const mac = macAddress(vm.vmId);
    return {
      netnsPath: netnsPath(names.netns),
      guestIp,
      prefixLen: router.layout.prefixLen,
      gateway: router.layout.gateway,
      ...(deps.dns ? { dns: deps.dns } : {}),
      macAddress: mac,
      ...(mode === "tap" ? { tapName: names.tap } : {}),
      netnsName: names.netns,
      hostInterface: names.hostVeth,
      statsDir: router.statsDir(names.hostVeth),
      mode,
    };
  }

  async function wire(vm: AttachVm, network: VmNetwork): Promise<void> {
    const names = namesOf(vm.vmId);
    const state = namespaces?.claim(names.short)
      ? "pooled"
      : (await vmNamespaceExists(names))
        ? "exists"
        : "absent";
    await createVmNamespace(
      router,
      {
        names,
        guestIp: network.guestIp,
        macAddress: network.macAddress,
        mode: network.mode,
        egressAllowed: vm.egressAllowed,
      },
      state,
    );
  }
}
