import { EXISTS, GONE, inNetns } from "./command.js";
import type { AddressLayout } from "./pool.js";

/**
 * Egress policy of the VMs behind one router, as iptables rules inside the router's own network
 * namespace — nothing is added to the host's firewall. Every VM's traffic enters the router on its
 * `kv-*` interface and passes, in order:
 *
 *   KILN-FWD     replies to established connections pass; VM traffic goes to KILN-EGRESS;
 *                the host may open connections to VMs (port forwarding); nothing else passes.
 *   KILN-EGRESS  KILN-BLOCK (always), then KILN-ALLOW, then reject.
 *   KILN-BLOCK   destinations no VM may reach on any tier: link-local 169.254/16 (the
 *                169.254.169.254 metadata service and friends), other clouds' metadata addresses,
 *                the host's own addresses, the VM network itself (other VMs), loopback,
 *                multicast and reserved ranges, plus operator-configured CIDRs.
 *   KILN-ALLOW   one `-i kv-<vm> -j ACCEPT` rule per VM whose tier allows egress
 *                (TenantLimits.egressAllowed; FREE has none).
 *
 * A VM without an ALLOW rule has no egress, so a VM is closed until its policy is applied.
 * Rejections answer at once (TCP reset, ICMP port unreachable) so clients fail fast instead of
 * timing out. KILN-IN keeps VMs off the router itself except ping and replies.
 */
export const ALWAYS_BLOCKED = [
  "169.254.0.0/16", // link-local, incl. 169.254.169.254 (AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle)
  "100.100.100.200/32", // Alibaba Cloud metadata
  "168.63.129.16/32", // Azure wire server
  "127.0.0.0/8",
  "0.0.0.0/8",
  "224.0.0.0/4", // multicast
  "240.0.0.0/4", // reserved, broadcast
] as const;

export interface EgressOptions {
  /** The router's network namespace. */
  netns: string;
  layout: AddressLayout;
  /** The router's end of the host link (traffic from the host to VMs enters here). */
  uplinkInterface: string;
  /** The host's own IPv4 addresses, blocked as destinations. */
  hostAddresses: readonly string[];
  /** Operator-configured destinations to block on top of ALWAYS_BLOCKED. */
  blockedCidrs?: readonly string[];
}

export interface EgressPolicy {
  /** (Re)writes the router's firewall, keeping the per-VM ALLOW rules already present. */
  install(): Promise<void>;
  /**
   * Lets the VM behind `hostVeth` open outbound connections, or not. Idempotent. `fresh`: the
   * interface was just created, so no rule names it yet and nothing needs reading first.
   */
  setAllowed(hostVeth: string, allowed: boolean, opts?: { fresh?: boolean }): Promise<void>;
  /** Removes the VM's rules (on detach). Idempotent. */
  remove(hostVeth: string): Promise<void>;
  /** Interfaces with an ALLOW rule (leak checks). */
  allowedInterfaces(): Promise<string[]>;
  /** Destinations in KILN-BLOCK. */
  readonly blocked: readonly string[];
}

const IPT = ["iptables", "-w"] as const;

export function createEgressPolicy(opts: EgressOptions): EgressPolicy {
  const { netns } = opts;
  const blocked = [
    ...ALWAYS_BLOCKED,
    opts.layout.cidr.text,
    ...opts.hostAddresses.map((a) => `${a}/32`),
    ...(opts.blockedCidrs ?? []),
  ];
  const iptables = (args: string[], tolerate?: RegExp) =>
    inNetns(netns, IPT[0], [...IPT.slice(1), ...args], { tolerate });
  const allowRule = (hostVeth: string) => ["-i", hostVeth, "-j", "ACCEPT"];
  // Changes run one at a time: each reads the rules before writing them, and install()
  // rewrites the whole table.
  let queue: Promise<unknown> = Promise.resolve();
  const serial = <T>(fn: () => Promise<T>): Promise<T> => {
    const result = queue.then(fn, fn);
    queue = result.catch(() => undefined);
    return result;
  };

  async function removeRules(hostVeth: string): Promise<void> {
    // Delete every copy (a crash between check and add could have left two).
    for (let i = 0; i < 10; i++) {
      if (!(await allowedInterfaces()).includes(hostVeth)) return;
      await iptables(["-D", "KILN-ALLOW", ...allowRule(hostVeth)], GONE);
    }
  }

  async function allowedInterfaces(): Promise<string[]> {
    const out = await iptables(["-S", "KILN-ALLOW"], GONE);
    const names: string[] = [];
    for (const line of out.split("\n")) {
      const m = /^-A KILN-ALLOW -i (\S+) -j ACCEPT$/.exec(line.trim());
      if (m) names.push(m[1]!);
    }
    return names;
  }

  return {
    blocked,
    allowedInterfaces,
    install: () =>
      serial(async () => {
        // The router namespace holds only Kiln's rules, so its tables are written whole and
        // atomically; the ALLOW rules of VMs already running survive a metald restart.
        const keep = await allowedInterfaces().catch(() => [] as string[]);
        const up = opts.uplinkInterface;
        const rejectAll = (chain: string, match: string) => [
          `-A ${chain} ${match} -p tcp -j REJECT --reject-with tcp-reset`,
          `-A ${chain} ${match} -j REJECT --reject-with icmp-port-unreachable`,
        ];
        const lines = [
          "*filter",
          ":INPUT ACCEPT [0:0]",
          ":FORWARD DROP [0:0]",
          ":OUTPUT ACCEPT [0:0]",
          ":KILN-IN - [0:0]",
          ":KILN-FWD - [0:0]",
          ":KILN-EGRESS - [0:0]",
          ":KILN-BLOCK - [0:0]",
          ":KILN-ALLOW - [0:0]",
          "-A INPUT -j KILN-IN",
          "-A FORWARD -j KILN-FWD",
          "-A KILN-IN -i kv+ -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
          "-A KILN-IN -i kv+ -p icmp --icmp-type echo-request -j ACCEPT",
          ...rejectAll("KILN-IN", "-i kv+"),
          "-A KILN-FWD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
          "-A KILN-FWD -i kv+ -j KILN-EGRESS",
          `-A KILN-FWD -i ${up} -o kv+ -j ACCEPT`,
          "-A KILN-EGRESS -j KILN-BLOCK",
          "-A KILN-EGRESS -j KILN-ALLOW",
          ...rejectAll("KILN-EGRESS", ""),
          ...blocked.flatMap((cidr) => rejectAll("KILN-BLOCK", `-d ${cidr}`)),
          ...keep.map((dev) => `-A KILN-ALLOW ${allowRule(dev).join(" ")}`),
          "COMMIT",
          "*nat",
          ":PREROUTING ACCEPT [0:0]",
          ":INPUT ACCEPT [0:0]",
          ":OUTPUT ACCEPT [0:0]",
          ":POSTROUTING ACCEPT [0:0]",
          ":KILN-POSTROUTING - [0:0]",
          "-A POSTROUTING -j KILN-POSTROUTING",
          // VMs' outbound connections leave with the router's address on the way out, so the next
          // hop needs no route back to the VM network.
          `-A KILN-POSTROUTING -s ${opts.layout.cidr.text} ! -o kv+ -j MASQUERADE`,
          "COMMIT",
          "",
        ];
        await inNetns(netns, "iptables-restore", ["-w"], {
          input: lines.map((l) => l.replace(/ {2,}/g, " ")).join("\n"),
        });
      }),
    setAllowed: (hostVeth, allowed, { fresh = false } = {}) =>
      serial(async () => {
        if (fresh && !allowed) return;
        const present = fresh ? false : (await allowedInterfaces()).includes(hostVeth);
        if (allowed && !present) await iptables(["-A", "KILN-ALLOW", ...allowRule(hostVeth)], EXISTS);
        if (!allowed && present) await removeRules(hostVeth);
      }),
    remove: (hostVeth) => serial(() => removeRules(hostVeth)),
  };
}
