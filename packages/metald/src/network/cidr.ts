import { InvalidArgumentError } from "@kiln/kit";

/** An IPv4 network in CIDR form, with integer arithmetic for allocation. */
export interface Ipv4Cidr {
  /** Normalised text, e.g. `10.213.0.0/16`. */
  readonly text: string;
  readonly network: number;
  readonly prefixLen: number;
  /** Number of addresses, network and broadcast included. */
  readonly size: number;
  contains(ip: string): boolean;
  /** The address at `offset` from the network address. */
  at(offset: number): string;
}

export function parseIpv4(text: string): number {
  const parts = text.split(".");
  if (parts.length !== 4) throw new Error(`${JSON.stringify(text)} is not an IPv4 address`);
  let n = 0;
  for (const p of parts) {
    if (!/^\d{1,3}$/.test(p) || Number(p) > 255)
      throw new Error(`${JSON.stringify(text)} is not an IPv4 address`);
    n = n * 256 + Number(p);
  }
  return n;
}

export function formatIpv4(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join(".");
}

/** Parses `a.b.c.d/len`; `setting` names the configuration entry in errors. */
export function parseCidr(
  text: string,
  setting = "network CIDR",
  opts: { anyLength?: boolean } = {},
): Ipv4Cidr {
  const m = /^([\d.]+)\/(\d{1,2})$/.exec(text.trim());
  let base: number;
  try {
    if (!m) throw new Error("expected a.b.c.d/len");
    base = parseIpv4(m[1]!);
  } catch (err) {
    throw new InvalidArgumentError(
      `${setting} ${JSON.stringify(text)} is not an IPv4 CIDR such as 10.213.0.0/16`,
      {
        cause: err,
      },
    );
  }
  const prefixLen = Number(m[2]);
  if (prefixLen > 32 || (!opts.anyLength && (prefixLen < 8 || prefixLen > 29))) {
    throw new InvalidArgumentError(
      `${setting} ${text}: prefix length must be between /8 and /29 (got /${prefixLen})`,
    );
  }
  const size = 2 ** (32 - prefixLen);
  const network = base - (base % size);
  return {
    text: `${formatIpv4(network)}/${prefixLen}`,
    network,
    prefixLen,
    size,
    contains(ip: string) {
      const n = parseIpv4(ip);
      return n >= network && n < network + size;
    },
    at(offset: number) {
      if (offset < 0 || offset >= size)
        throw new RangeError(`offset ${offset} outside ${formatIpv4(network)}/${prefixLen}`);
      return formatIpv4(network + offset);
    },
  };
}

/** Whether two networks share an address. */
export function overlaps(a: Ipv4Cidr, b: Ipv4Cidr): boolean {
  return a.network < b.network + b.size && b.network < a.network + a.size;
}
