import { randomBytes } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import type { Readable } from "node:stream";
import { createLogger, PUBLIC_REGISTRIES } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createLayerCache } from "../cache/layer-cache.js";
import { AddressNotAllowedError } from "../registry/address-guard.js";
import { RegistryNotFoundError, RegistryUnavailableError } from "../registry/errors.js";
import { InsecureTargetError } from "../registry/http.js";
import { type Descriptor, MEDIA, sha256, writeOciLayout } from "../testing/oci-layout.js";
import { pushLayout, startTestRegistry, type TestRegistry } from "../testing/registry.js";
import { DigestMismatchError, PlatformNotFoundError, RegistryNotAllowedError } from "./errors.js";
import { parseImageRef } from "./reference.js";
import { type ImageSource, openImageSource, type SourceOptions } from "./source.js";

const log = createLogger({ service: "test", level: "silent" });

async function readAll(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

/** An http server on loopback for fronts (flaky, redirecting, silent) in front of the registry. */
async function startFront(handler: http.RequestListener): Promise<{ host: string; close(): Promise<void> }> {
  const server = http.createServer(handler);
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    host: `127.0.0.1:${(server.address() as AddressInfo).port}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

function forward(target: string, req: http.IncomingMessage, res: http.ServerResponse): void {
  const up = http.request(
    `http://${target}${req.url}`,
    { method: req.method, headers: { ...req.headers, host: target } },
    (r) => {
      res.writeHead(r.statusCode ?? 502, r.headers);
      r.pipe(res);
    },
  );
  up.on("error", () => res.destroy());
  req.pipe(up);
}

describe("docker:// sources against docker-registry", () => {
  const dir = tempDir("kiln-docker-source-");
  let registry: TestRegistry;
  let tags: Record<string, Descriptor>;
  const fronts: Array<{ close(): Promise<void> }> = [];

  const opts = (extra?: Partial<SourceOptions>): SourceOptions => ({
    insecureRegistries: [registry.host],
    // The test registry is not on the tier list: trusted registries count as allowed.
    allowedRegistries: PUBLIC_REGISTRIES,
    localImageDirs: [],
    log,
    tempDir: dir.path,
    http: { timeoutMs: 5000, retry: { retries: 2, initialDelayMs: 10, maxDelayMs: 50 } },
    ...extra,
  });
  const open = (uri: string, extra?: Partial<SourceOptions>): ImageSource =>
    openImageSource(parseImageRef(uri), opts(extra));

  beforeAll(async () => {
    const layout = `${dir.path}/layout`;
    const arch = (architecture: string, variant?: string) => ({
      layers: [[{ type: "file" as const, path: "arch", content: `${architecture}${variant ?? ""}` }]],
      architecture,
      ...(variant ? { variant } : {}),
      config: { Cmd: [`/bin/${architecture}`] },
    });
    tags = await writeOciLayout(layout, [
      {
        tag: "oci",
        image: {
          layers: [
            [
              { type: "dir", path: "etc" },
              { type: "file", path: "etc/hello", content: "hello" },
            ],
            [{ type: "file", path: "bin/app", content: Buffer.alloc(70_000, 7), mode: 0o755 }],
            [{ type: "file", path: "etc/hello", content: "hello again" }],
          ],
          config: {
            Entrypoint: ["/bin/app"],
            Env: ["A=1"],
            WorkingDir: "/srv",
            ExposedPorts: { "80/tcp": {} },
          },
        },
      },
      {
        tag: "docker",
        image: {
          dockerMediaTypes: true,
          layers: [[{ type: "file", path: "x", content: "x" }], [{ type: "file", path: "y", content: "y" }]],
          config: { Cmd: ["sh"] },
        },
      },
      {
        tag: "plain",
        image: { compression: "none", layers: [[{ type: "file", path: "p", content: "plain" }]] },
      },
      { tag: "multi", platforms: [arch("arm64", "v8"), arch("amd64"), arch("arm", "v7")] },
      { tag: "dockerlist", dockerMediaTypes: true, platforms: [arch("amd64"), arch("arm64")] },
      { tag: "noamd64", platforms: [arch("arm64", "v8"), arch("arm", "v7")] },
      { tag: "big", image: { layers: [[{ type: "file", path: "random", content: randomBytes(300_000) }]] } },
      {
        tag: "corrupt",
        image: { layers: [[{ type: "file", path: "c", content: "to be corrupted".repeat(100) }]] },
      },
      {
        tag: "badmanifest",
        image: { layers: [[{ type: "file", path: "m", content: "manifest to corrupt" }]] },
      },
      {
        tag: "arm-only",
        image: { architecture: "arm64", layers: [[{ type: "file", path: "a", content: "arm" }]] },
      },
    ]);
    registry = await startTestRegistry();
    for (const tag of Object.keys(tags)) {
      await pushLayout(layout, tag, registry.host, `kiln/${tag}`, {
        all: ["multi", "dockerlist", "noamd64"].includes(tag),
      });
    }
  }, 180_000);

  afterAll(async () => {
    await Promise.all(fronts.map((f) => f.close()));
    await registry?.stop();
    dir.remove();
  });

  it("pulls a multi-layer OCI image by tag, every blob verified", async () => {
    const source = open(`docker://${registry.host}/kiln/oci:oci`);
    expect(source.registryLabel).toBe(registry.host);
    const image = await source.resolve();
    expect(image.manifestDigest).toBe(tags.oci?.digest);
    expect(image.indexDigest).toBeUndefined();
    expect(image.platform).toBe("linux/amd64");
    expect(image.config.config).toMatchObject({ Entrypoint: ["/bin/app"], Env: ["A=1"], WorkingDir: "/srv" });
    expect(image.layers).toHaveLength(3);
    for (const layer of image.layers) {
      expect(layer).toMatchObject({ mediaType: MEDIA.ociLayerGzip, compression: "gzip" });
      const bytes = await readAll(await source.openBlob(layer));
      expect(sha256(bytes)).toBe(layer.digest);
      expect(bytes.length).toBe(layer.size);
    }
  });

  it("pulls by digest", async () => {
    const digest = tags.oci?.digest;
    const image = await open(`docker://${registry.host}/kiln/oci@${digest}`).resolve();
    expect(image.manifestDigest).toBe(digest);
    expect(image.layers).toHaveLength(3);
  });

  it("reports a digest the repository does not have as not found", async () => {
    // Another image's digest: the registry does not have it under this repository.
    const err = await open(`docker://${registry.host}/kiln/oci@${tags.docker?.digest}`)
      .resolve()
      .catch((e) => e);
    expect(err).toBeInstanceOf(RegistryNotFoundError);
  });

  it("reads Docker v2 media types", async () => {
    const source = open(`docker://${registry.host}/kiln/docker:docker`);
    const image = await source.resolve();
    expect(image.manifestDigest).toBe(tags.docker?.digest);
    expect(image.config.config?.Cmd).toEqual(["sh"]);
    expect(image.layers.map((l) => [l.mediaType, l.compression])).toEqual([
      [MEDIA.dockerLayerGzip, "gzip"],
      [MEDIA.dockerLayerGzip, "gzip"],
    ]);
  });

  it("reads uncompressed OCI layers", async () => {
    const image = await open(`docker://${registry.host}/kiln/plain:plain`).resolve();
    expect(image.layers[0]).toMatchObject({ mediaType: MEDIA.ociLayer, compression: "none" });
  });

  it("resolves an OCI index to linux/amd64", async () => {
    const source = open(`docker://${registry.host}/kiln/multi:multi`);
    const image = await source.resolve();
    expect(image.indexDigest).toBe(tags.multi?.digest);
    expect(image.manifestDigest).not.toBe(tags.multi?.digest);
    expect(image.platform).toBe("linux/amd64");
    expect(image.config.config?.Cmd).toEqual(["/bin/amd64"]);
    const bytes = await readAll(await source.openBlob(image.layers[0] as never));
    expect(sha256(bytes)).toBe(image.layers[0]?.digest);
  });

  it("resolves a Docker manifest list to linux/amd64", async () => {
    const image = await open(`docker://${registry.host}/kiln/dockerlist:dockerlist`).resolve();
    expect(image.indexDigest).toBe(tags.dockerlist?.digest);
    expect(image.config.config?.Cmd).toEqual(["/bin/amd64"]);
  });

  it("lists the available platforms when an index has no linux/amd64", async () => {
    const err = await open(`docker://${registry.host}/kiln/noamd64:noamd64`)
      .resolve()
      .catch((e) => e);
    expect(err).toBeInstanceOf(PlatformNotFoundError);
    expect(err.message).toContain("no linux/amd64 variant");
    expect(err.message).toContain("linux/arm64/v8, linux/arm/v7");
  });

  it("refuses a single-platform image for another architecture", async () => {
    const err = await open(`docker://${registry.host}/kiln/arm-only:arm-only`)
      .resolve()
      .catch((e) => e);
    expect(err.message).toContain("is for linux/arm64");
  });

  it("streams a corrupted layer blob as stored; ingesting it fails with DigestMismatchError and caches nothing", async () => {
    const source = open(`docker://${registry.host}/kiln/corrupt:corrupt`);
    const image = await source.resolve();
    const layer = image.layers[0];
    if (!layer) throw new Error("no layer");
    const file = registry.blobPath(layer.digest);
    const bytes = fs.readFileSync(file);
    bytes[bytes.length - 20] = (bytes[bytes.length - 20] ?? 0) ^ 0xff;
    fs.writeFileSync(file, bytes);
    // The source hands over the bytes as the registry stores them; the cache is the one check.
    expect((await readAll(await source.openBlob(layer))).equals(bytes)).toBe(true);
    const cache = createLayerCache(`${dir.path}/cache`);
    const err = await cache.ingest(layer, () => source.openBlob(layer)).catch((e) => e);
    expect(err).toBeInstanceOf(DigestMismatchError);
    expect(err.message).toContain(`expected ${layer.digest}`);
    expect(await cache.has(layer.digest)).toBe(false);
    expect(fs.readdirSync(`${dir.path}/cache/sha256`)).toEqual([]);
  });

  it("fails a corrupted manifest (by tag: the computed digest differs from Docker-Content-Digest)", async () => {
    const digest = tags.badmanifest?.digest as string;
    const file = registry.blobPath(digest);
    const bytes = fs.readFileSync(file);
    // Same JSON, different bytes: a trailing space changes the digest, not the meaning.
    fs.writeFileSync(file, Buffer.concat([bytes.subarray(0, bytes.length - 1), Buffer.from(" }")]));
    const err = await open(`docker://${registry.host}/kiln/badmanifest:badmanifest`)
      .resolve()
      .catch((e) => e);
    expect(err).toBeInstanceOf(DigestMismatchError);
    expect(err.message).toContain(digest);
    const byDigest = await open(`docker://${registry.host}/kiln/badmanifest@${digest}`)
      .resolve()
      .catch((e) => e);
    expect(byDigest).toBeInstanceOf(DigestMismatchError);
    expect(byDigest.message).toContain(`expected ${digest}`);
  });

  it("refuses 127.0.0.1 unless the registry is in UNKEY_BUILDERD_INSECURE_REGISTRIES", async () => {
    const err = await open(`docker://${registry.host}/kiln/oci:oci`, {
      insecureRegistries: [],
      allowedRegistries: ["*"],
    })
      .resolve()
      .catch((e) => e);
    expect(err).toBeInstanceOf(AddressNotAllowedError);
    expect(err.message).toContain("loopback");
    expect(err.message).toContain("UNKEY_BUILDERD_INSECURE_REGISTRIES");
  });

  it("refuses a host name that resolves to loopback (localhost:PORT)", async () => {
    const port = registry.host.split(":")[1];
    const err = await open(`docker://localhost:${port}/kiln/oci:oci`, { allowedRegistries: ["*"] })
      .resolve()
      .catch((e) => e);
    expect(err).toBeInstanceOf(AddressNotAllowedError);
    expect(err.message).toMatch(/resolves to (127\.0\.0\.1|::1)/);
  });

  it("refuses a registry outside the tier's allow-list, naming it and the rule", () => {
    expect(() =>
      open("docker://registry.example.com/app:1", { allowedRegistries: ["docker.io", "ghcr.io"] }),
    ).toThrow(RegistryNotAllowedError);
    expect(() => open("docker://registry.example.com/app:1", { allowedRegistries: ["docker.io"] })).toThrow(
      /registry registry\.example\.com is not in this tenant tier's registry allow-list \(docker\.io\)/,
    );
    expect(() => open("alpine", { allowedRegistries: ["*.example.com"] })).toThrow(RegistryNotAllowedError);
    expect(() => open("docker://a.example.com/app", { allowedRegistries: ["*.example.com"] })).not.toThrow();
  });

  it("retries 503s with backoff and succeeds", async () => {
    let failures = 0;
    const front = await startFront((req, res) => {
      if (req.url?.includes("/manifests/") && failures < 2) {
        failures++;
        res.writeHead(503).end();
        return;
      }
      forward(registry.host, req, res);
    });
    fronts.push(front);
    const image = await open(`docker://${front.host}/kiln/oci:oci`, {
      insecureRegistries: [front.host],
    }).resolve();
    expect(failures).toBe(2);
    expect(image.manifestDigest).toBe(tags.oci?.digest);
  });

  it("gives up after the retries with an unavailable error, and does not retry 404s", async () => {
    let requests = 0;
    const front = await startFront((req, res) => {
      requests++;
      res.writeHead(req.url?.includes("missing") ? 404 : 503).end();
    });
    fronts.push(front);
    const o = { insecureRegistries: [front.host] };
    const err = await open(`docker://${front.host}/kiln/oci:oci`, o)
      .resolve()
      .catch((e) => e);
    expect(err).toBeInstanceOf(RegistryUnavailableError);
    expect(err.message).toContain("answered 503");
    expect(requests).toBe(3);
    requests = 0;
    const notFound = await open(`docker://${front.host}/kiln/missing:oci`, o)
      .resolve()
      .catch((e) => e);
    expect(notFound).toBeInstanceOf(RegistryNotFoundError);
    expect(requests).toBe(1);
  });

  it("times out a registry that does not answer", async () => {
    const front = await startFront(() => {
      // never answers
    });
    fronts.push(front);
    const err = await open(`docker://${front.host}/kiln/oci:oci`, {
      insecureRegistries: [front.host],
      http: { timeoutMs: 200, retry: { retries: 1, initialDelayMs: 10 } },
    })
      .resolve()
      .catch((e) => e);
    expect(err).toBeInstanceOf(RegistryUnavailableError);
    expect(err.message).toContain("no answer");
  });

  it("follows blob redirects to trusted targets without forwarding credentials, and refuses others", async () => {
    const seen: Array<string | undefined> = [];
    const target = await startFront((req, res) => {
      seen.push(req.headers.authorization);
      forward(registry.host, req, res);
    });
    fronts.push(target);
    const redirecting = (to: string) =>
      startFront((req, res) => {
        if (req.url?.includes("/blobs/")) {
          res.writeHead(307, { location: `${to}${req.url}` }).end();
          return;
        }
        forward(registry.host, req, res);
      });
    const good = await redirecting(`http://${target.host}`);
    fronts.push(good);
    const source = open(`docker://${good.host}/kiln/docker:docker`, {
      insecureRegistries: [good.host],
      auth: { token: "not-needed-by-this-registry" },
    });
    const image = await source.resolve();
    const bytes = await readAll(await source.openBlob(image.layers[0] as never));
    expect(sha256(bytes)).toBe(image.layers[0]?.digest);
    expect(seen.length).toBeGreaterThan(0);
    expect(seen.every((h) => h === undefined)).toBe(true);

    const port = target.host.split(":")[1];
    for (const [to, error] of [
      [`https://localhost:${port}`, AddressNotAllowedError],
      [`https://10.0.0.1:${port}`, AddressNotAllowedError],
      [`http://localhost:${port}`, InsecureTargetError],
    ] as const) {
      const bad = await redirecting(to);
      fronts.push(bad);
      const err = await open(`docker://${bad.host}/kiln/docker:docker`, { insecureRegistries: [bad.host] })
        .resolve()
        .catch((e) => e);
      expect(err, to).toBeInstanceOf(error);
    }
  });

  it.each([
    ["honours Range", true],
    ["ignores Range", false],
  ])("resumes a blob download that breaks off midway (registry %s)", async (_label, honourRange) => {
    const ranges: Array<string | undefined> = [];
    let broken = 0;
    const front = await startFront((req, res) => {
      if (!req.url?.includes("/blobs/")) {
        forward(registry.host, req, res);
        return;
      }
      ranges.push(req.headers.range);
      if (!honourRange) delete req.headers.range;
      if (broken < 2) {
        broken++;
        // Full length promised, a third delivered, then the connection dies.
        const up = http.get(`http://${registry.host}${req.url}`, (r) => {
          const length = Number(r.headers["content-length"]);
          if (length < 1000) {
            res.writeHead(r.statusCode ?? 502, r.headers);
            r.pipe(res);
            broken--;
            return;
          }
          res.writeHead(200, { "content-length": String(length) });
          let sent = 0;
          r.on("data", (c: Buffer) => {
            if (sent >= length / 3) return;
            res.write(c.subarray(0, Math.max(0, Math.min(c.length, Math.floor(length / 3) - sent))));
            sent += c.length;
            if (sent >= length / 3) setTimeout(() => res.socket?.destroy(), 20);
          });
        });
        up.on("error", () => res.destroy());
        return;
      }
      forward(registry.host, req, res);
    });
    fronts.push(front);
    const source = open(`docker://${front.host}/kiln/big:big`, { insecureRegistries: [front.host] });
    const image = await source.resolve();
    const big = image.layers[0];
    if (!big) throw new Error("no layer");
    expect(big.size).toBeGreaterThan(300_000);
    const bytes = await readAll(await source.openBlob(big));
    expect(sha256(bytes)).toBe(big.digest);
    expect(broken).toBe(2);
    expect(ranges.filter((r) => r?.startsWith("bytes="))).toHaveLength(2);
  });

  it("stops after five redirects", async () => {
    const loop = await startFront((req, res) => {
      res.writeHead(302, { location: req.url ?? "/" }).end();
    });
    fronts.push(loop);
    const err = await open(`docker://${loop.host}/kiln/oci:oci`, { insecureRegistries: [loop.host] })
      .resolve()
      .catch((e) => e);
    expect(err.message).toContain("redirected more than 5 times");
  });
});
