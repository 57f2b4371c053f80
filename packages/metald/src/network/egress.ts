import { GONE, inNetns, ip } from "./command.js";
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
 *   KILN-ALLOW   one rule: traffic entering on an interface in device group EGRESS_GROUP passes.
 *
 * A VM's egress is its router interface's device group (`ip link set kv-<vm> group 1`), set in
 * the same `ip` batch that wires the interface (TenantLimits.egressAllowed; FREE has none): no
 * iptables process per VM, and a rule set that does not grow with the number of VMs. An
 * interface outside the group has no egress, so a VM is closed until its policy is applied.
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

/** Device group of router interfaces whose VM may connect out (the router namespace is Kiln's alone). */
export const EGRESS_GROUP = 1;

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
  /** (Re)writes the router's firewall; VMs' egress (their interfaces' group) is kept. */
  install(): Promise<void>;
  /** Lets the VM behind `hostVeth` open outbound connections, or not (tier change). Idempotent. */
  setAllowed(hostVeth: string, allowed: boolean): Promise<void>;
  /** Interfaces whose VM may connect out (leak checks). */
  allowedInterfaces(): Promise<string[]>;
  /** Destinations in KILN-BLOCK. */
  readonly blocked: readonly string[];
}

export function createEgressPolicy(opts: EgressOptions): EgressPolicy {
  const { netns } = opts;
  const blocked = [
    ...ALWAYS_BLOCKED,
    opts.layout.cidr.text,
    ...opts.hostAddresses.map((a) => `${a}/32`),
    ...(opts.blockedCidrs ?? []),
  ];
  const setGroup = (hostVeth: string, group: number) =>
    ip(netns, ["link", "set", "dev", hostVeth, "group", String(group)]);

  async function allowedInterfaces(): Promise<string[]> {
    const out = await ip(netns, ["-j", "link", "show", "group", String(EGRESS_GROUP)], { tolerate: GONE });
    // `ip -j` prints an empty object for every interface outside the group.
    const links = JSON.parse(out || "[]") as Array<{ ifname?: string }>;
    return links.flatMap((l) => l.ifname ?? []).sort();
  }

  return {
    blocked,
    allowedInterfaces,
    async install() {
      // The router namespace holds only Kiln's rules, so its tables are written whole and
      // atomically; running VMs' egress lives on their interfaces and survives a restart.
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
        `-A KILN-ALLOW -m devgroup --src-group ${EGRESS_GROUP} -j ACCEPT`,
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
    },
    async setAllowed(hostVeth, allowed) {
      await setGroup(hostVeth, allowed ? EGRESS_GROUP : 0);
    },
  };
}
