import dns from "node:dns";
import net, { type LookupFunction } from "node:net";
import { PermissionDeniedError } from "@kiln/kit";

/**
 * SSRF protection: builds must not become a way into the host's network. A registry, a token
 * realm or a redirect target may only be reached on a public address unless the operator trusts
 * it (UNKEY_BUILDERD_INSECURE_REGISTRIES). The check runs inside the socket's DNS lookup, so the
 * address validated is the address connected to: a name that resolves differently the second
 * time (DNS rebinding) gains nothing.
 */

export class AddressNotAllowedError extends PermissionDeniedError {
  constructor(
    readonly host: string,
    readonly address: string,
    readonly reason: string,
  ) {
    super(
      `refusing to connect to ${host}: ${host === address ? "it" : `it resolves to ${address}, which`} is a ${reason} address; builds may only reach public addresses unless the operator lists the registry (host:port) in UNKEY_BUILDERD_INSECURE_REGISTRIES`,
    );
  }
}

const V4_RANGES: Array<[string, number, string]> = [
  ["0.0.0.0", 8, "unspecified (this-network)"],
  ["10.0.0.0", 8, "private (RFC 1918)"],
  ["100.64.0.0", 10, "carrier-grade NAT (RFC 6598)"],
  ["127.0.0.0", 8, "loopback"],
  ["169.254.0.0", 16, "link-local"],
  ["172.16.0.0", 12, "private (RFC 1918)"],
  ["192.0.0.0", 24, "reserved (IETF protocol assignments)"],
  ["192.168.0.0", 16, "private (RFC 1918)"],
  ["198.18.0.0", 15, "reserved (benchmarking)"],
  ["224.0.0.0", 4, "multicast"],
  ["240.0.0.0", 4, "reserved"],
];
const V6_RANGES: Array<[string, number, string]> = [
  ["::", 128, "unspecified"],
  ["::1", 128, "loopback"],
  ["fe80::", 10, "link-local"],
  ["fec0::", 10, "site-local"],
  ["fc00::", 7, "unique local (ULA)"],
  ["ff00::", 8, "multicast"],
];
const v4Lists = V4_RANGES.map(([addr, prefix, reason]) => {
  const list = new net.BlockList();
  list.addSubnet(addr, prefix, "ipv4");
  return { list, reason };
});
const v6Lists = V6_RANGES.map(([addr, prefix, reason]) => {
  const list = new net.BlockList();
  list.addSubnet(addr, prefix, "ipv6");
  return { list, reason };
});

/** The 8 16-bit groups of an IPv6 address (with or without an embedded dotted quad). */
function ipv6Groups(address: string): number[] | undefined {
  let a = address.toLowerCase();
  const zone = a.indexOf("%");
  if (zone >= 0) a = a.slice(0, zone);
  const tail: number[] = [];
  const dotted = /(\d+\.\d+\.\d+\.\d+)$/.exec(a);
  if (dotted?.[1]) {
    const o = dotted[1].split(".").map(Number);
    tail.push(((o[0] ?? 0) << 8) | (o[1] ?? 0), ((o[2] ?? 0) << 8) | (o[3] ?? 0));
    a = a.slice(0, a.length - dotted[1].length);
    if (a.endsWith(":") && !a.endsWith("::")) a = a.slice(0, -1);
  }
  const [head, rest] = a.split("::") as [string, string | undefined];
  const parse = (s: string) => (s === "" ? [] : s.split(":").map((g) => Number.parseInt(g, 16)));
  const left = parse(head);
  const right = [...parse(rest ?? ""), ...tail];
  if (rest === undefined && left.length + tail.length !== 8) return undefined;
  const fill = 8 - left.length - right.length;
  if (fill < 0) return undefined;
  const groups = [...left, ...new Array<number>(fill).fill(0), ...right];
  return groups.every((g) => Number.isInteger(g) && g >= 0 && g <= 0xffff) ? groups : undefined;
}

function embeddedV4(groups: number[], hi: number, lo: number): string {
  const a = groups[hi] ?? 0;
  const b = groups[lo] ?? 0;
  return `${a >> 8}.${a & 0xff}.${b >> 8}.${b & 0xff}`;
}

/**
 * Why an address must not be reached ("loopback", "private (RFC 1918)", …), or undefined when it
 * is public. IPv6 forms that embed an IPv4 address (mapped, compatible, NAT64, 6to4) are judged
 * by the IPv4 address inside.
 */
export function forbiddenAddressReason(address: string): string | undefined {
  if (net.isIPv4(address)) return v4Lists.find((r) => r.list.check(address, "ipv4"))?.reason;
  if (!net.isIPv6(address)) return "malformed";
  const g = ipv6Groups(address);
  if (!g) return "malformed";
  const zero = (from: number, to: number) => g.slice(from, to).every((x) => x === 0);
  let inner: string | undefined;
  if (zero(0, 5) && g[5] === 0xffff)
    inner = embeddedV4(g, 6, 7); // ::ffff:a.b.c.d (mapped)
  else if (zero(0, 6) && !(g[6] === 0 && (g[7] === 0 || g[7] === 1)))
    inner = embeddedV4(g, 6, 7); // ::a.b.c.d (compatible)
  else if (g[0] === 0x64 && g[1] === 0xff9b && zero(2, 6))
    inner = embeddedV4(g, 6, 7); // 64:ff9b::/96 (NAT64)
  else if (g[0] === 0x2002) inner = embeddedV4(g, 1, 2); // 2002::/16 (6to4)
  if (inner !== undefined) {
    const reason = forbiddenAddressReason(inner);
    return reason === undefined ? undefined : `${reason} (IPv4 ${inner} inside IPv6)`;
  }
  const canonical = g.map((x) => x.toString(16)).join(":");
  return v6Lists.find((r) => r.list.check(canonical, "ipv6"))?.reason;
}

type Resolver = (hostname: string) => Promise<Array<{ address: string; family: number }>>;

const systemResolver: Resolver = (hostname) => dns.promises.lookup(hostname, { all: true, verbatim: true });

/** URL hostname without IPv6 brackets. */
export function bareHostname(url: URL): string {
  return url.hostname.startsWith("[") ? url.hostname.slice(1, -1) : url.hostname;
}

/** Throws AddressNotAllowedError when the URL's host is an IP literal that must not be reached. */
export function checkLiteralAddress(url: URL): void {
  const host = bareHostname(url);
  if (net.isIP(host) === 0) return;
  const reason = forbiddenAddressReason(host);
  if (reason) throw new AddressNotAllowedError(url.host, host, reason);
}

/**
 * A `lookup` for node:net that resolves every address of the name and fails the connection with
 * AddressNotAllowedError if any of them must not be reached (one bad answer taints the name:
 * round-robin would otherwise let an attacker win eventually).
 */
export function createGuardedLookup(
  displayHost: string,
  resolver: Resolver = systemResolver,
): LookupFunction {
  return ((hostname: string, options: dns.LookupOptions, callback: (...args: unknown[]) => void) => {
    resolver(hostname).then(
      (all) => {
        const family = typeof options.family === "number" ? options.family : 0;
        const addresses = family === 4 || family === 6 ? all.filter((a) => a.family === family) : all;
        if (addresses.length === 0) {
          const err = Object.assign(new Error(`${hostname} has no ${family ? `IPv${family} ` : ""}address`), {
            code: "ENOTFOUND",
          });
          callback(err);
          return;
        }
        for (const a of addresses) {
          const reason = forbiddenAddressReason(a.address);
          if (reason) {
            callback(new AddressNotAllowedError(displayHost, a.address, reason));
            return;
          }
        }
        if (options.all) callback(null, addresses);
        else callback(null, addresses[0]?.address, addresses[0]?.family);
      },
      (err: unknown) => callback(err),
    );
  }) as LookupFunction;
}
