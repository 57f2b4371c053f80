import { createLogger } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parseImageRef } from "../sources/reference.js";
import { openImageSource, type SourceOptions } from "../sources/source.js";
import { type Descriptor, writeOciLayout } from "../testing/oci-layout.js";
import { pushLayout, startTestRegistry, type TestRegistry } from "../testing/registry.js";
import { parseChallenges } from "./auth.js";
import { RegistryAuthError } from "./errors.js";

const log = createLogger({ service: "test", level: "silent" });
const USER = { username: "kiln", password: "s3cret-Pa55" };

function options(registry: TestRegistry, auth?: SourceOptions["auth"]): SourceOptions {
  return {
    ...(auth ? { auth } : {}),
    insecureRegistries: [registry.host],
    allowedRegistries: ["docker.io"],
    localImageDirs: [],
    log,
    tempDir: "/nonexistent",
    http: { timeoutMs: 5000, retry: { retries: 1, initialDelayMs: 10 } },
  };
}

async function pullAll(registry: TestRegistry, auth?: SourceOptions["auth"]) {
  const source = openImageSource(
    parseImageRef(`docker://${registry.host}/kiln/app:v1`),
    options(registry, auth),
  );
  const image = await source.resolve();
  for (const layer of image.layers) {
    const stream = await source.openBlob(layer);
    for await (const _ of stream) {
      // drain: the stream verifies as it flows
    }
  }
  return image;
}

describe("WWW-Authenticate parsing", () => {
  it("reads Bearer params with quoted commas and several challenges", () => {
    expect(
      parseChallenges([
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push"',
        'Basic realm="x"',
      ]),
    ).toEqual([
      {
        scheme: "bearer",
        params: {
          realm: "https://auth.docker.io/token",
          service: "registry.docker.io",
          scope: "repository:samalba/my-app:pull,push",
        },
      },
      { scheme: "basic", params: { realm: "x" } },
    ]);
    expect(parseChallenges(['Basic realm="a \\"b\\"", Bearer realm=https://r/t'])).toEqual([
      { scheme: "basic", params: { realm: 'a "b"' } },
      { scheme: "bearer", params: { realm: "https://r/t" } },
    ]);
  });
});

describe("registry authentication against docker-registry", () => {
  const dir = tempDir("kiln-auth-");
  let top: Descriptor;
  let basic: TestRegistry;
  let token: TestRegistry;
  let tokenAnon: TestRegistry;

  beforeAll(async () => {
    const layout = `${dir.path}/layout`;
    const tags = await writeOciLayout(layout, [
      {
        tag: "v1",
        image: {
          layers: [
            [{ type: "file", path: "a.txt", content: "a" }],
            [{ type: "file", path: "b.txt", content: "b" }],
          ],
        },
      },
    ]);
    top = tags.v1 as Descriptor;
    [basic, token, tokenAnon] = await Promise.all([
      startTestRegistry({ htpasswd: USER }),
      startTestRegistry({ htpasswd: USER, token: true }),
      startTestRegistry({ token: true }),
    ]);
    const creds = `${USER.username}:${USER.password}`;
    await Promise.all([
      pushLayout(layout, "v1", basic.host, "kiln/app", { creds }),
      pushLayout(layout, "v1", token.host, "kiln/app", { creds }),
      pushLayout(layout, "v1", tokenAnon.host, "kiln/app"),
    ]);
  }, 120_000);

  afterAll(async () => {
    await Promise.all([basic?.stop(), token?.stop(), tokenAnon?.stop()]);
    dir.remove();
  });

  it("pulls with Basic credentials", async () => {
    const image = await pullAll(basic, USER);
    expect(image.manifestDigest).toBe(top.digest);
  });

  it("reports refused Basic credentials without echoing them", async () => {
    const err = await pullAll(basic, { username: USER.username, password: "wrong-password" }).catch((e) => e);
    expect(err).toBeInstanceOf(RegistryAuthError);
    expect(err.message).toContain(`registry ${basic.host} refused the credentials`);
    expect(err.message).not.toContain("wrong-password");
  });

  it("says authentication is required when none was given", async () => {
    const err = await pullAll(basic).catch((e) => e);
    expect(err).toBeInstanceOf(RegistryAuthError);
    expect(err.message).toContain("requires authentication");
  });

  it("pulls through the bearer token flow, one token per scope for the whole pull", async () => {
    const before = token.tokenServer?.requests ?? 0;
    const image = await pullAll(token, USER);
    expect(image.manifestDigest).toBe(top.digest);
    expect(image.layers).toHaveLength(2);
    // manifest + config + 2 layers, all under repository:kiln/app:pull: one token.
    expect((token.tokenServer?.requests ?? 0) - before).toBe(1);
  });

  it("gets an anonymous bearer token when the token service allows it", async () => {
    const image = await pullAll(tokenAnon);
    expect(image.manifestDigest).toBe(top.digest);
  });

  it("reports credentials the token service refuses", async () => {
    const err = await pullAll(token, { username: USER.username, password: "nope" }).catch((e) => e);
    expect(err).toBeInstanceOf(RegistryAuthError);
    expect(err.message).toContain(`registry ${token.host} refused the credentials`);
    expect(err.message).not.toContain("nope");
  });

  it("sends a given token as the bearer without asking the token service", async () => {
    const server = token.tokenServer;
    if (!server) throw new Error("token server missing");
    const given = server.issue(["repository:kiln/app:pull"], USER.username);
    const before = server.requests;
    const image = await pullAll(token, { token: given });
    expect(image.manifestDigest).toBe(top.digest);
    expect(server.requests).toBe(before);
  });

  it("reports a given token the registry refuses", async () => {
    const server = token.tokenServer;
    if (!server) throw new Error("token server missing");
    // A valid token for another repository: the registry answers 401 for this one.
    const other = server.issue(["repository:other/repo:pull"]);
    const err = await pullAll(token, { token: other }).catch((e) => e);
    expect(err).toBeInstanceOf(RegistryAuthError);
    expect(err.message).toContain("refused the credentials");
  });
});
