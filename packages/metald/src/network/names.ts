import { createHash } from "node:crypto";
import { InvalidArgumentError } from "@kiln/kit";

/**
 * Kernel object names for one VM. Interface names are limited to 15 characters, so each VM gets
 * a 12-character short id: the random tail of a Kiln id (`vm_<10 time chars><16 random chars>`,
 * whose time prefix is shared by VMs created close together), or a hash for any other id. Names
 * are derived, never stored, so recovery after a restart finds the same objects.
 */
export function shortId(vmId: string): string {
  if (!VM_ID.test(vmId)) {
    throw new InvalidArgumentError(
      `vm id ${JSON.stringify(vmId)} is not usable in kernel object names: use [A-Za-z0-9_-], 1–64 chars`,
      {
        field: "vm_id",
      },
    );
  }
  const kiln = /^[a-z]+_[0-9a-z]{26}$/.exec(vmId);
  if (kiln) return vmId.slice(-12);
  return createHash("sha256").update(vmId).digest("hex").slice(0, 12);
}

export const VM_ID = /^[A-Za-z0-9_-]{1,64}$/;

export interface VmNetworkNames {
  short: string;
  /** The VM's network namespace (`<prefix>-<short>`, pinned at /var/run/netns/). */
  netns: string;
  /** The router-side end of the VM's veth pair (in the router namespace). */
  hostVeth: string;
  /** The VM-side end, inside the VM namespace. */
  guestVeth: string;
  /** QEMU's tap device inside the VM namespace (tap mode). */
  tap: string;
  /** Bridge joining guestVeth and tap inside the VM namespace (tap mode). */
  bridge: string;
}

export function vmNetworkNames(vmId: string, netnsPrefix: string): VmNetworkNames {
  return networkNamesOf(shortId(vmId), netnsPrefix);
}

/** The names for a short id (see shortId). */
export function networkNamesOf(short: string, netnsPrefix: string): VmNetworkNames {
  return {
    short,
    netns: `${netnsPrefix}${short}`,
    hostVeth: `kv-${short}`,
    guestVeth: "eth0",
    tap: "tap0",
    bridge: "br0",
  };
}

/** A stable, locally administered unicast MAC for the VM's interface (02:…, from the vm id). */
export function macAddress(vmId: string): string {
  const h = createHash("sha256").update(`mac:${vmId}`).digest();
  const bytes = [0x02, h[0]!, h[1]!, h[2]!, h[3]!, h[4]!];
  return bytes.map((b) => b.toString(16).padStart(2, "0")).join(":");
}
