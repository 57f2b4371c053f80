import fs from "node:fs";
import path from "node:path";
import { HEADERS } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterAll, describe, expect, it } from "vitest";
import { createCliContext } from "./client.js";

describe("CLI context", () => {
  const dir = tempDir("kiln-cli-context-");
  afterAll(() => dir.remove());

  it("gives a service's endpoint with the tenant's headers and the service token", () => {
    const ctx = createCliContext(
      { tenant: "acme", tier: "enterprise" },
      { KILN_SERVICE_TOKEN: "tok", UNKEY_ASSETMANAGERD_PORT: "18083" },
    );
    expect(ctx.endpoint("assetmanagerd")).toEqual({
      baseUrl: "http://127.0.0.1:18083",
      headers: {
        [HEADERS.tenantId]: "acme",
        [HEADERS.tenantTier]: "enterprise",
        [HEADERS.serviceToken]: "tok",
      },
    });
    // The call options name the tenant but carry no token (the transport's interceptor adds it).
    expect(ctx.callOptions.headers[HEADERS.serviceToken]).toBeUndefined();
  });

  it("takes the URL from KILN_<SERVICE>_URL and the token from the data dir", () => {
    fs.writeFileSync(path.join(dir.path, "service-token"), "from-file\n");
    const ctx = createCliContext(
      { dataDir: dir.path },
      { KILN_ASSETMANAGERD_URL: "http://assets.internal:9000" },
    );
    const ep = ctx.endpoint("assetmanagerd");
    expect(ep.baseUrl).toBe("http://assets.internal:9000");
    expect(ep.headers[HEADERS.serviceToken]).toBe("from-file");
    expect(ep.headers[HEADERS.tenantId]).toBe("default");
  });

  it("says how to get a token when there is none", () => {
    const ctx = createCliContext({ dataDir: path.join(dir.path, "missing") }, {});
    expect(() => ctx.endpoint("assetmanagerd")).toThrow(/no service token.*kiln up/);
    expect(() => ctx.transport("assetmanagerd")).toThrow(/no service token/);
  });
});
