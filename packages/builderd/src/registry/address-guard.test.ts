import type { LookupAddress } from "node:dns";
import { describe, expect, it } from "vitest";
import { AddressNotAllowedError, createGuardedLookup, forbiddenAddressReason } from "./address-guard.js";

describe("forbiddenAddressReason", () => {
  it.each([
    ["127.0.0.1", "loopback"],
    ["127.255.0.9", "loopback"],
    ["10.1.2.3", "private (RFC 1918)"],
    ["172.16.0.1", "private (RFC 1918)"],
    ["172.31.255.255", "private (RFC 1918)"],
    ["192.168.1.1", "private (RFC 1918)"],
    ["169.254.169.254", "link-local"],
    ["100.64.0.1", "carrier-grade NAT (RFC 6598)"],
    ["100.127.255.255", "carrier-grade NAT (RFC 6598)"],
    ["0.0.0.0", "unspecified (this-network)"],
    ["224.0.0.1", "multicast"],
    ["255.255.255.255", "reserved"],
    ["::1", "loopback"],
    ["::", "unspecified"],
    ["fe80::1", "link-local"],
    ["fe80::1%eth0", "link-local"],
    ["fd00::1", "unique local (ULA)"],
    ["fc12:3456::1", "unique local (ULA)"],
    ["ff02::1", "multicast"],
    ["::ffff:127.0.0.1", "loopback (IPv4 127.0.0.1 inside IPv6)"],
    ["::ffff:7f00:1", "loopback (IPv4 127.0.0.1 inside IPv6)"],
    ["0:0:0:0:0:ffff:a9fe:a9fe", "link-local (IPv4 169.254.169.254 inside IPv6)"],
    ["::10.0.0.1", "private (RFC 1918) (IPv4 10.0.0.1 inside IPv6)"],
    ["64:ff9b::192.168.0.1", "private (RFC 1918) (IPv4 192.168.0.1 inside IPv6)"],
    ["2002:7f00:1::", "loopback (IPv4 127.0.0.1 inside IPv6)"],
    ["not-an-ip", "malformed"],
  ])("refuses %s (%s)", (address, reason) => {
    expect(forbiddenAddressReason(address)).toBe(reason);
  });

  it.each([
    "1.1.1.1",
    "8.8.8.8",
    "100.128.0.1",
    "172.32.0.1",
    "192.169.0.1",
    "2606:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
  ])("allows public %s", (address) => {
    expect(forbiddenAddressReason(address)).toBeUndefined();
  });
});

function lookupOnce(
  lookup: ReturnType<typeof createGuardedLookup>,
  host: string,
  all: boolean,
): Promise<{ err: unknown; result: unknown }> {
  return new Promise((resolve) => {
    (lookup as unknown as (h: string, o: object, cb: (err: unknown, r?: unknown) => void) => void)(
      host,
      { all },
      (err, result) => resolve({ err, result }),
    );
  });
}

describe("createGuardedLookup", () => {
  it("refuses a name that resolves to loopback (the real resolver: localhost)", async () => {
    const { err } = await lookupOnce(createGuardedLookup("localhost:5000"), "localhost", true);
    expect(err).toBeInstanceOf(AddressNotAllowedError);
    expect((err as Error).message).toContain("UNKEY_BUILDERD_INSECURE_REGISTRIES");
    expect((err as Error).message).toContain("loopback");
  });

  it("validates every lookup, so a name rebinding to a private address is refused at connect time", async () => {
    const answers: LookupAddress[][] = [
      [{ address: "93.184.216.34", family: 4 }],
      [{ address: "10.0.0.7", family: 4 }],
    ];
    const lookup = createGuardedLookup("rebind.example:443", async () => answers.shift() ?? []);
    const first = await lookupOnce(lookup, "rebind.example", false);
    expect(first.err).toBeNull();
    expect(first.result).toBe("93.184.216.34");
    const second = await lookupOnce(lookup, "rebind.example", true);
    expect(second.err).toBeInstanceOf(AddressNotAllowedError);
    expect((second.err as AddressNotAllowedError).address).toBe("10.0.0.7");
  });

  it("refuses a name when any of its addresses is private", async () => {
    const lookup = createGuardedLookup("mixed.example", async () => [
      { address: "93.184.216.34", family: 4 },
      { address: "fd00::5", family: 6 },
    ]);
    const { err } = await lookupOnce(lookup, "mixed.example", true);
    expect(err).toBeInstanceOf(AddressNotAllowedError);
  });
});
