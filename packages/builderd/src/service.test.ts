import { execFile, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import type net from "node:net";
import path from "node:path";
import { promisify } from "node:util";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { AssetManagerService, builderd as api, BuilderService } from "@kiln/api";
import { assetmanagerd } from "@kiln/assetmanagerd";
import { startTestService, type TestService, tempDir } from "@kiln/kit/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_TMPFS, isTmpfs, treeRootPath } from "./builds/tree-root.js";
import { builderd } from "./definition.js";
import { fsckImage, snapshotImage } from "./rootfs/ext4/testing/image-tree.js";
import { type EntrySpec, writeOciLayout } from "./testing/oci-layout.js";
import { pushLayout, startTestRegistry } from "./testing/registry.js";

const run = promisify(execFile);
const S = api.BuildState;
/** Where a builderd on its defaults assembles extracted trees (builds/tree-root.ts): the tmpfs, if any. */
const haveTmpfs = await isTmpfs(DEFAULT_TMPFS);
const treeOf = (dataDir: string, tenant: string, buildId: string) =>
  haveTmpfs
    ? path.join(treeRootPath(DEFAULT_TMPFS, dataDir), buildId)
    : path.join(dataDir, "tenants", tenant, "builds", buildId, "rootfs");

/**
 * A front for the registry whose blob downloads, but those of `pass` (an image's config), wait
 * until `release()`: tests use it to hold a build in PULLING (quotas, cancel, timeout, crash
 * recovery) deterministically, its tree made and waiting for the first layer.
 */
async function gatedFront(upstream: string, pass: string[]) {
  let open = false;
  let waiters: Array<() => void> = [];
  const server = http.createServer((req, res) => {
    const forward = () => {
      const up = http.request(
        {
          host: upstream.split(":")[0],
          port: Number(upstream.split(":")[1]),
          path: req.url,
          method: req.method,
          headers: req.headers,
        },
        (r) => {
          res.writeHead(r.statusCode ?? 502, r.headers);
          r.pipe(res);
        },
      );
      up.on("error", () => res.destroy());
      req.pipe(up);
    };
    const url = req.url ?? "";
    const held = /\/blobs\/sha256:/.test(url) && !pass.some((d) => url.endsWith(`/blobs/${d}`));
    if (held && !open && req.method === "GET") waiters.push(forward);
    else forward();
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return {
    host: `127.0.0.1:${(server.address() as net.AddressInfo).port}`,
    /** Blobs requested so far and still held. */
    held: () => waiters.length,
    release() {
      open = true;
      for (const w of waiters) w();
      waiters = [];
    },
    close: () => {
      server.closeAllConnections();
      server.close();
    },
  };
}

/** The config blob's digest of the image whose manifest is `manifest` in the OCI layout at `dir`. */
async function configDigest(dir: string, manifest: string): Promise<string> {
  const blob = path.join(dir, "blobs", "sha256", manifest.slice("sha256:".length));
  return JSON.parse(await fs.promises.readFile(blob, "utf8")).config.digest;
}

const busybox = fs.readFileSync("/bin/busybox");
const appLayers: EntrySpec[][] = [
  [
    { type: "dir", path: "bin" },
    { type: "file", path: "bin/busybox", content: busybox, mode: 0o755 },
    { type: "symlink", path: "bin/sh", target: "busybox" },
    { type: "symlink", path: "bin/httpd", target: "busybox" },
    { type: "dir", path: "etc" },
    {
      type: "file",
      path: "etc/passwd",
      content: "root:x:0:0:root:/root:/bin/sh\nwww:x:1000:1000::/www:/bin/sh\n",
    },
    { type: "file", path: "etc/group", content: "root:x:0:\nwww:x:1000:\n" },
  ],
  [
    { type: "dir", path: "www", uid: 1000, gid: 1000 },
    { type: "file", path: "www/index.html", content: "hello from kiln\n", uid: 1000, gid: 1000 },
    { type: "dir", path: "usr/share/doc/app" },
    { type: "file", path: "usr/share/doc/app/README", content: "docs".repeat(1000) },
  ],
];
const appConfig = {
  Cmd: ["httpd", "-f", "-v", "-p", "80", "-h", "/www"],
  Env: ["PATH=/bin", "GREETING=hi"],
  ExposedPorts: { "80/tcp": {} },
  Labels: { "org.example.app": "demo" },
};

describe("builderd", () => {
  const work = tempDir("kiln-builderd-svc-");
  let registry: Awaited<ReturnType<typeof startTestRegistry>>;
  let gate: Awaited<ReturnType<typeof gatedFront>>;
  let svc: TestService;
  let assets: TestService;
  let client: ReturnType<typeof createClient<typeof BuilderService>>;
  const as = (tenant: string, tier = "pro") => ({
    headers: { "x-kiln-service-token": svc.token, "x-kiln-tenant-id": tenant, "x-kiln-tenant-tier": tier },
  });
  const image = (repo: string, host = registry.host) => `docker://${host}/${repo}`;
  const createBuild = (
    uri: string,
    tenant = "acme",
    extra: Partial<{ timeoutSeconds: number; tier: string }> = {},
  ) =>
    client.createBuild(
      {
        config: {
          source: { sourceType: { case: "dockerImage", value: { imageUri: uri } } },
          timeoutSeconds: extra.timeoutSeconds ?? 0,
          target: {
            targetType: { case: "microvmRootfs", value: { optimization: { removeDocs: true } } },
          },
        },
      },
      as(tenant, extra.tier),
    );
  const waitEnd = async (buildId: string, tenant = "acme") => {
    for await (const _ of client.streamBuildLogs({ buildId, follow: true }, as(tenant))) {
    }
    return (await client.getBuild({ buildId }, as(tenant))).build!;
  };
  // An image's tree without mtimes: mkfs keeps whole seconds (Kiln's writer nanoseconds), and the
  // injected init files are stamped when each build made them.
  const imageTree = async (img: string) =>
    Object.fromEntries(
      Object.entries((await snapshotImage(img)).nodes).map(([p, { mtimeMs: _, ...n }]) => [p, n]),
    );

  beforeAll(async () => {
    registry = await startTestRegistry();
    const layout = path.join(work.path, "layout");
    const tags = await writeOciLayout(layout, [
      { tag: "1", image: { layers: appLayers, config: appConfig } },
      { tag: "zstd", image: { layers: appLayers, config: appConfig, compression: "zstd" } },
      {
        tag: "evil",
        image: {
          layers: [
            [
              {
                type: "raw",
                header: { name: "../../escape", type: "file", size: 4, mode: 0o644 },
                content: Buffer.from("evil"),
              },
            ],
          ],
        },
      },
      {
        // Big enough to be extracted while it downloads (several cache writes).
        tag: "corrupt",
        image: { layers: [[{ type: "file", path: "noise", content: randomBytes(4 << 20) }]] },
      },
    ]);
    await pushLayout(layout, "1", registry.host, "app");
    await pushLayout(layout, "zstd", registry.host, "app-zstd");
    await pushLayout(layout, "evil", registry.host, "evil");
    await pushLayout(layout, "corrupt", registry.host, "corrupt");
    gate = await gatedFront(registry.host, [await configDigest(layout, tags["1"]!.digest)]);
    // builderd registers every rootfs with a real assetmanagerd, which imports it from
    // builderd's data dir (as under `kiln up`, where they share one).
    const builderData = path.join(work.path, "builderd-data");
    assets = await startTestService(assetmanagerd, {
      env: { UNKEY_ASSETMANAGERD_IMPORT_DIRS: path.join(builderData, "tenants") },
    });
    svc = await startTestService(builderd, {
      env: {
        UNKEY_BUILDERD_DATA_DIR: builderData,
        UNKEY_BUILDERD_INSECURE_REGISTRIES: `${registry.host},${gate.host}`,
        UNKEY_BUILDERD_LOCAL_IMAGE_DIRS: work.path,
      },
      peerTransport: () => assets.service.transport,
    });
    client = createClient(
      BuilderService,
      createConnectTransport({ baseUrl: svc.baseUrl, httpVersion: "1.1" }),
    );
  }, 120_000);

  afterAll(async () => {
    gate?.release();
    await svc?.stop();
    await assets?.stop();
    gate?.close();
    await registry?.stop();
    work.remove();
  });

  it("builds an image into an ext4 rootfs with its metadata, returning the id at once", async () => {
    const res = await createBuild(image("app:1"));
    expect(res.buildId).toMatch(/^bld_/);
    expect([S.PENDING, S.PULLING]).toContain(res.state);
    const build = await waitEnd(res.buildId);
    expect(build.errorMessage).toBe("");
    expect(build.state).toBe(S.COMPLETED);
    expect(build.progressPercent).toBe(100);
    expect(build.rootfsChecksum).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(fs.statSync(build.rootfsPath).size).toBe(Number(build.rootfsSizeBytes));
    // Registered with assetmanagerd, which owns the file now (the build dir keeps no copy).
    const assetClient = createClient(AssetManagerService, assets.service.transport);
    const { asset } = await assetClient.getAsset(
      { id: build.assetId },
      { headers: { "x-kiln-tenant-id": "acme" } },
    );
    expect(asset).toMatchObject({
      checksum: build.rootfsChecksum,
      location: build.rootfsPath,
      buildId: build.buildId,
    });
    expect(asset?.labels.docker_image).toBe(image("app:1"));
    expect(asset?.imageConfig?.command).toEqual(appConfig.Cmd);
    const buildDir = path.join(svc.dataDir, "tenants", "acme", "builds", build.buildId);
    expect(fs.existsSync(path.join(buildDir, "rootfs.ext4"))).toBe(false);
    // The extracted tree left its place before the build completed, and its deletion, which
    // went on in the background, ends.
    expect(fs.existsSync(treeOf(svc.dataDir, "acme", build.buildId))).toBe(false);
    expect(fs.existsSync(path.join(buildDir, "temp"))).toBe(false);
    const trashes = [path.join(svc.dataDir, "tenants", ".trash")];
    if (haveTmpfs) trashes.push(path.join(treeRootPath(DEFAULT_TMPFS, svc.dataDir), ".trash"));
    await expect
      .poll(() => trashes.flatMap((t) => (fs.existsSync(t) ? fs.readdirSync(t) : [])), { timeout: 10_000 })
      .toEqual([]);
    expect(build.imageMetadata).toMatchObject({
      command: appConfig.Cmd,
      env: { PATH: "/bin", GREETING: "hi" },
      exposedPorts: ["80/tcp"],
      labels: { "org.example.app": "demo" },
      platform: "linux/amd64",
    });
    expect(build.imageMetadata?.layers).toHaveLength(2);
    expect(build.metrics?.layersDownloaded).toBe(2);
    // The image holds the workload, the injected init, not the removed docs.
    const ls = async (p: string) => (await run("debugfs", ["-R", `ls -p ${p}`, build.rootfsPath])).stdout;
    expect(await ls("/www")).toContain("index.html");
    expect(await ls("/.kiln")).toMatch(/init/);
    expect(await ls("/usr/share/doc")).not.toContain("app");
    const stat = (await run("debugfs", ["-R", "stat /www/index.html", build.rootfsPath])).stdout;
    expect(stat).toMatch(/User:\s+1000\s+Group:\s+1000/);
  });

  it("makes the same tree with UNKEY_BUILDERD_EXT4_WRITER=mkfs (mkfs.ext4 -d) as with Kiln's writer", async () => {
    const mkfsSvc = await startTestService(builderd, {
      env: {
        UNKEY_BUILDERD_INSECURE_REGISTRIES: registry.host,
        UNKEY_BUILDERD_EXT4_WRITER: "mkfs",
        UNKEY_BUILDERD_REGISTER_ASSETS: "false",
      },
    });
    try {
      const mkfsClient = createClient(BuilderService, mkfsSvc.service.transport);
      const headers = { "x-kiln-tenant-id": "acme", "x-kiln-tenant-tier": "pro" };
      const { buildId } = await mkfsClient.createBuild(
        {
          config: {
            source: { sourceType: { case: "dockerImage", value: { imageUri: image("app:1") } } },
            target: { targetType: { case: "microvmRootfs", value: { optimization: { removeDocs: true } } } },
          },
        },
        { headers },
      );
      for await (const _ of mkfsClient.streamBuildLogs({ buildId, follow: true }, { headers })) {
      }
      const viaMkfs = (await mkfsClient.getBuild({ buildId }, { headers })).build!;
      expect(viaMkfs.errorMessage).toBe("");
      const viaKiln = await waitEnd((await createBuild(image("app:1"))).buildId);
      expect(viaKiln.errorMessage).toBe("");
      for (const b of [viaMkfs, viaKiln]) {
        const fsck = await fsckImage(b.rootfsPath);
        expect(fsck.clean, fsck.output).toBe(true);
      }
      expect(await imageTree(viaKiln.rootfsPath)).toEqual(await imageTree(viaMkfs.rootfsPath));
    } finally {
      await mkfsSvc.stop();
    }
  });

  it("builds an image with zstd layers into the same rootfs as its gzip twin", async () => {
    const viaZstd = await waitEnd((await createBuild(image("app-zstd:zstd"))).buildId);
    expect(viaZstd.errorMessage).toBe("");
    expect(viaZstd.state).toBe(S.COMPLETED);
    const viaGzip = await waitEnd((await createBuild(image("app:1"))).buildId);
    expect(viaZstd.imageMetadata?.layers).not.toEqual(viaGzip.imageMetadata?.layers);
    const fsck = await fsckImage(viaZstd.rootfsPath);
    expect(fsck.clean, fsck.output).toBe(true);
    expect(await imageTree(viaZstd.rootfsPath)).toEqual(await imageTree(viaGzip.rootfsPath));
  });

  // A tree root with less room than a tree may need (a container's 64 MiB /dev/shm, say): each
  // build checks, and extracts in its build dir instead.
  it.skipIf(process.getuid?.() !== 0)(
    "extracts in the build dir when the tree root is short of room, and says so",
    async () => {
      const small = path.join(work.path, "small-tmpfs");
      fs.mkdirSync(small);
      await run("mount", ["-t", "tmpfs", "-o", "size=16m,mode=0700", "kiln-test-small", small]);
      let smallSvc: TestService | undefined;
      try {
        smallSvc = await startTestService(builderd, {
          env: {
            UNKEY_BUILDERD_INSECURE_REGISTRIES: registry.host,
            UNKEY_BUILDERD_TREE_DIR: small,
            UNKEY_BUILDERD_REGISTER_ASSETS: "false",
          },
        });
        const c = createClient(BuilderService, smallSvc.service.transport);
        const headers = { "x-kiln-tenant-id": "acme", "x-kiln-tenant-tier": "pro" };
        const { buildId } = await c.createBuild(
          {
            config: { source: { sourceType: { case: "dockerImage", value: { imageUri: image("app:1") } } } },
          },
          { headers },
        );
        for await (const _ of c.streamBuildLogs({ buildId, follow: true }, { headers })) {
        }
        const { build } = await c.getBuild({ buildId }, { headers });
        expect(build?.errorMessage).toBe("");
        expect(build?.state).toBe(S.COMPLETED);
        expect(smallSvc.logs).toContainEqual(
          expect.objectContaining({
            msg: "tree root short of room: extracting in the build dir",
            build_id: buildId,
            tenant_id: "acme",
          }),
        );
      } finally {
        await smallSvc?.stop();
        await run("umount", [small]);
      }
    },
  );

  it("streams the build's log with stages, and progress in bytes", async () => {
    const res = await createBuild(image("app:1"), "logs-tenant");
    const stages = new Set<number>();
    let sawBytes = false;
    const lines: string[] = [];
    for await (const m of client.streamBuildLogs({ buildId: res.buildId, follow: true }, as("logs-tenant"))) {
      stages.add(m.state);
      if (m.progress && m.progress.bytesTotal > 0n) sawBytes = true;
      if (m.entry) lines.push(`${m.entry.component}: ${m.entry.message}`);
    }
    expect([...stages]).toEqual(
      expect.arrayContaining([S.PULLING, S.EXTRACTING, S.BUILDING, S.OPTIMIZING, S.COMPLETED]),
    );
    expect(sawBytes).toBe(true);
    expect(lines.join("\n")).toMatch(/pulling layer 1\/2/);
    // History replays without follow, ending with the state.
    const replay: string[] = [];
    for await (const m of client.streamBuildLogs(
      { buildId: res.buildId, follow: false },
      as("logs-tenant"),
    )) {
      if (m.entry) replay.push(`${m.entry.component}: ${m.entry.message}`);
    }
    expect(replay).toEqual(lines);
  });

  it("builds the same image again without downloading anything, returning the same asset", async () => {
    const first = await waitEnd((await createBuild(image("app:1"), "reuse")).buildId, "reuse");
    const again = await waitEnd((await createBuild(image("app:1"), "reuse")).buildId, "reuse");
    expect(again.state).toBe(S.COMPLETED);
    expect(again.assetId).toBe(first.assetId);
    expect(again.rootfsChecksum).toBe(first.rootfsChecksum);
    expect(again.metrics?.bytesDownloaded).toBe(0n);
    expect(again.currentStep).toBe(`reused the rootfs of ${first.buildId}`);
    // Deleting a build does not delete the asset others use.
    await client.deleteBuild({ buildId: first.buildId }, as("reuse"));
    expect(fs.existsSync(again.rootfsPath)).toBe(true);
    // Another tenant building the same image gets its own asset (on the same stored bytes).
    const other = await waitEnd((await createBuild(image("app:1"), "reuse-b")).buildId, "reuse-b");
    expect(other.assetId).not.toBe(first.assetId);
    expect(other.rootfsChecksum).not.toBe("");
  });

  it("keeps tenants apart: another tenant's build is not found", async () => {
    const { buildId } = await createBuild(image("app:1"), "owner");
    for (const call of [
      () => client.getBuild({ buildId }, as("intruder")),
      () => client.cancelBuild({ buildId }, as("intruder")),
      () => client.deleteBuild({ buildId }, as("intruder")),
    ]) {
      const err = await call().catch((e) => ConnectError.from(e));
      expect((err as ConnectError).code).toBe(Code.NotFound);
    }
    const list = await client.listBuilds({}, as("intruder"));
    expect(list.builds.map((b) => b.buildId)).not.toContain(buildId);
    await waitEnd(buildId, "owner");
  });

  it("lists builds newest first, filtered by state, page by page", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) ids.push((await createBuild(image("app:1"), "lister")).buildId);
    for (const id of ids) await waitEnd(id, "lister");
    const p1 = await client.listBuilds({ pageSize: 2, stateFilter: [S.COMPLETED] }, as("lister"));
    expect(p1.totalCount).toBe(3);
    expect(p1.builds.map((b) => b.buildId)).toEqual([ids[2], ids[1]]);
    const p2 = await client.listBuilds(
      { pageSize: 2, stateFilter: [S.COMPLETED], pageToken: p1.nextPageToken },
      as("lister"),
    );
    expect(p2.builds.map((b) => b.buildId)).toEqual([ids[0]]);
    expect(p2.nextPageToken).toBe("");
    expect((await client.listBuilds({ stateFilter: [S.FAILED] }, as("lister"))).totalCount).toBe(0);
    const bad = await client
      .listBuilds({ pageToken: "garbage" }, as("lister"))
      .catch((e) => ConnectError.from(e));
    expect((bad as ConnectError).code).toBe(Code.InvalidArgument);
  });

  it("fails a hostile image with an error naming the entry, leaving nothing outside", async () => {
    const build = await waitEnd((await createBuild(image("evil:evil"), "hostile")).buildId, "hostile");
    expect(build.state).toBe(S.FAILED);
    expect(build.errorMessage).toContain("../../escape");
    expect(fs.existsSync(path.join(svc.dataDir, "tenants", "hostile", "escape"))).toBe(false);
    expect(fs.existsSync(path.join(svc.dataDir, "tenants", "hostile", "builds", build.buildId))).toBe(false);
  });

  it("fails an image whose layer blob is corrupt in the registry, though extraction followed the download", async () => {
    const manifest = JSON.parse(
      await (
        await fetch(`http://${registry.host}/v2/corrupt/manifests/corrupt`, {
          headers: { accept: "application/vnd.oci.image.manifest.v1+json" },
        })
      ).text(),
    ) as { layers: Array<{ digest: string }> };
    const digest = manifest.layers[0]!.digest;
    const file = registry.blobPath(digest);
    const bytes = fs.readFileSync(file);
    // In the middle of the random (stored) data: the gzip stream itself stays well-formed.
    bytes[bytes.length >> 1] = (bytes[bytes.length >> 1] ?? 0) ^ 0xff;
    fs.writeFileSync(file, bytes);
    const build = await waitEnd((await createBuild(image("corrupt:corrupt"), "corrupt")).buildId, "corrupt");
    expect(build.state).toBe(S.FAILED);
    expect(build.errorMessage).toContain(`layer digest mismatch: expected ${digest}`);
    const tenant = path.join(svc.dataDir, "tenants", "corrupt");
    expect(fs.existsSync(path.join(tenant, "builds", build.buildId))).toBe(false);
    expect(fs.readdirSync(path.join(tenant, "cache", "blobs", "sha256"))).toEqual([]);
  });

  it("refuses a malformed image reference with invalid_argument", async () => {
    const err = await createBuild("docker://Not A Ref").catch((e) => ConnectError.from(e));
    expect((err as ConnectError).code).toBe(Code.InvalidArgument);
  });

  it("refuses, at once, a registry outside the tier's allow-list and local paths outside the operator's dirs", async () => {
    const err = await createBuild("docker://registry.example.com/app:1", "free-tenant", {
      tier: "free",
    }).catch((e) => ConnectError.from(e));
    expect((err as ConnectError).code).toBe(Code.PermissionDenied);
    expect((err as ConnectError).rawMessage).toContain("registry.example.com");
    const local = await createBuild("oci:/etc:latest").catch((e) => ConnectError.from(e));
    expect((local as ConnectError).code).toBe(Code.PermissionDenied);
    expect((local as ConnectError).rawMessage).toContain("UNKEY_BUILDERD_LOCAL_IMAGE_DIRS");
    expect((await client.listBuilds({}, as("free-tenant", "free"))).totalCount).toBe(0);
  });

  it("builds from a local OCI layout inside the operator's dirs", async () => {
    const build = await waitEnd(
      (await createBuild(`oci:${path.join(work.path, "layout")}:1`, "local")).buildId,
      "local",
    );
    expect(build.errorMessage).toBe("");
    expect(build.state).toBe(S.COMPLETED);
  });

  it("enforces MaxDailyBuilds per tier, naming the limit (free: 20 a day)", async () => {
    const uri = `oci:${path.join(work.path, "layout")}:1`;
    for (let i = 0; i < 20; i++) {
      const { buildId } = await createBuild(uri, "daily", { tier: "free" });
      expect((await waitEnd(buildId, "daily")).state).toBe(S.COMPLETED);
    }
    const err = await createBuild(uri, "daily", { tier: "free" }).catch((e) => ConnectError.from(e));
    expect((err as ConnectError).code).toBe(Code.ResourceExhausted);
    expect((err as ConnectError).rawMessage).toMatch(/^MaxDailyBuilds \(20\) reached/);
    // Another tenant's allowance is its own.
    const other = await createBuild(uri, "daily-other", { tier: "free" });
    expect((await waitEnd(other.buildId, "daily-other")).state).toBe(S.COMPLETED);
  });

  it("refuses a registry on a loopback address the operator did not list", async () => {
    const build = await waitEnd((await createBuild("docker://127.0.0.1:1/app:1", "ssrf")).buildId, "ssrf");
    expect(build.state).toBe(S.FAILED);
    expect(build.errorMessage).toMatch(/UNKEY_BUILDERD_INSECURE_REGISTRIES/);
  });

  describe("with layer downloads held", () => {
    it("enforces MaxConcurrentBuilds per tier, naming the limit", async () => {
      const first = await createBuild(image("app:1", gate.host), "quota", { tier: "free" });
      const err = await createBuild(image("app:1", gate.host), "quota", { tier: "free" }).catch((e) =>
        ConnectError.from(e),
      );
      expect((err as ConnectError).code).toBe(Code.ResourceExhausted);
      expect((err as ConnectError).rawMessage).toMatch(/^MaxConcurrentBuilds \(1\) reached/);
      const cancelled = await client.cancelBuild({ buildId: first.buildId }, as("quota", "free"));
      expect(cancelled).toMatchObject({ success: true, state: S.CANCELLED });
    });

    it("cancels a running build, removing its files", async () => {
      const { buildId } = await createBuild(image("app:1", gate.host), "cancel");
      // The tree is made before the first layer arrives: on the tmpfs when there is one.
      const tree = treeOf(svc.dataDir, "cancel", buildId);
      await expect.poll(() => fs.existsSync(tree), { timeout: 15_000 }).toBe(true);
      expect([S.PULLING, S.EXTRACTING]).toContain(
        (await client.getBuild({ buildId }, as("cancel"))).build?.state,
      );
      const r = await client.cancelBuild({ buildId }, as("cancel"));
      expect(r).toMatchObject({ success: true, state: S.CANCELLED });
      expect(fs.existsSync(path.join(svc.dataDir, "tenants", "cancel", "builds", buildId))).toBe(false);
      expect(fs.existsSync(tree)).toBe(false);
      // Cancelling again says it had already ended.
      expect(await client.cancelBuild({ buildId }, as("cancel"))).toMatchObject({
        success: false,
        state: S.CANCELLED,
      });
    });

    it("fails a build past its timeout with the reason", async () => {
      const { buildId } = await createBuild(image("app:1", gate.host), "slow", { timeoutSeconds: 1 });
      const build = await waitEnd(buildId, "slow");
      expect(build.state).toBe(S.FAILED);
      expect(build.errorMessage).toBe("timed out after 1s");
    });
  });

  it("exposes the seeds' metrics", async () => {
    const text = await (await fetch(`${svc.baseUrl}/metrics`)).text();
    expect(text).toMatch(/builderd_builds_total\{status="completed"\} [1-9]/);
    expect(text).toMatch(/builderd_builds_total\{status="failed"\} [1-9]/);
    expect(text).toMatch(/builderd_builds_duration_seconds_count\{status="completed"\} [1-9]/);
    expect(text).toMatch(/builderd_docker_pulls_total\{registry="127\.0\.0\.1:\d+"\} [1-9]/);
    expect(text).toMatch(/builderd_docker_pull_duration_seconds_count/);
    expect(text).toMatch(/builderd_builds_queue_size 0/);
    expect(text).toMatch(/builderd_tenant_builds_active/);
  });
});

describe("builderd crash recovery", () => {
  it("fails a build interrupted by kill -9 with the reason on restart", async () => {
    const dir = tempDir("kiln-builderd-crash-");
    const registry = await startTestRegistry();
    const layout = path.join(dir.path, "layout");
    const tags = await writeOciLayout(layout, [
      { tag: "1", image: { layers: appLayers, config: appConfig } },
    ]);
    await pushLayout(layout, "1", registry.host, "app");
    const gate = await gatedFront(registry.host, [await configDigest(layout, tags["1"]!.digest)]);
    const env = {
      ...process.env,
      UNKEY_BUILDERD_PORT: "0",
      UNKEY_BUILDERD_METRICS_PORT: "0",
      UNKEY_BUILDERD_DATA_DIR: dir.path,
      UNKEY_BUILDERD_INSECURE_REGISTRIES: gate.host,
      UNKEY_BUILDERD_LOG_LEVEL: "info",
    };
    const main = new URL("./main.ts", import.meta.url).pathname;
    const child = spawn(process.execPath, ["--conditions=kiln-source", "--import", "tsx", main], {
      env,
      stdio: ["ignore", "pipe", "inherit"],
    });
    try {
      const port = await new Promise<number>((resolve, reject) => {
        let out = "";
        child.stdout.on("data", (c) => {
          out += c;
          const m = /"api":"127\.0\.0\.1:(\d+)"/.exec(out);
          if (m) resolve(Number(m[1]));
        });
        child.on("exit", (code) => reject(new Error(`builderd exited with ${code}: ${out}`)));
      });
      const token = fs.readFileSync(path.join(dir.path, "service-token"), "utf8").trim();
      const headers = { "x-kiln-service-token": token, "x-kiln-tenant-id": "acme" };
      const c = createClient(
        BuilderService,
        createConnectTransport({ baseUrl: `http://127.0.0.1:${port}`, httpVersion: "1.1" }),
      );
      const { buildId } = await c.createBuild(
        {
          config: {
            source: {
              sourceType: { case: "dockerImage", value: { imageUri: `docker://${gate.host}/app:1` } },
            },
          },
        },
        { headers },
      );
      await expect.poll(() => gate.held(), { timeout: 20_000 }).toBeGreaterThan(0);
      const tree = treeOf(dir.path, "acme", buildId);
      await expect.poll(() => fs.existsSync(tree), { timeout: 15_000 }).toBe(true);
      child.kill("SIGKILL");
      await new Promise((r) => child.once("exit", r));
      // A finished build's tree the killed process was still deleting in the background.
      const leftover = path.join(dir.path, "tenants", ".trash", "rootfs-0123456789ab");
      fs.mkdirSync(path.join(leftover, "etc"), { recursive: true });
      fs.writeFileSync(path.join(leftover, "etc", "passwd"), "root:x:0:0::/:/bin/sh\n");

      const svc = await startTestServiceOn(dir.path, gate.host);
      try {
        const c2 = createClient(
          BuilderService,
          createConnectTransport({ baseUrl: svc.baseUrl, httpVersion: "1.1" }),
        );
        const { build } = await c2.getBuild(
          { buildId },
          { headers: { ...headers, "x-kiln-service-token": svc.token } },
        );
        expect(build?.state).toBe(S.FAILED);
        expect(build?.errorMessage).toMatch(
          /^interrupted: builderd stopped while the build was (PULLING|EXTRACTING); start it again$/,
        );
        expect(fs.existsSync(path.join(dir.path, "tenants", "acme", "builds", buildId))).toBe(false);
        expect(fs.readdirSync(path.join(dir.path, "tenants", ".trash"))).toEqual([]);
        expect(fs.existsSync(tree)).toBe(false);
      } finally {
        await svc.service.stop();
      }
      // A graceful stop leaves nothing on the tmpfs.
      if (haveTmpfs) expect(fs.existsSync(treeRootPath(DEFAULT_TMPFS, dir.path))).toBe(false);
    } finally {
      child.kill("SIGKILL");
      gate.release();
      gate.close();
      await registry.stop();
      dir.remove();
    }
  }, 120_000);
});

/** Starts builderd in-process on an existing data dir (startTestService makes a new one). */
async function startTestServiceOn(dataDir: string, insecure: string) {
  const { startService } = await import("@kiln/kit");
  const { captureLogs } = await import("@kiln/kit/testing");
  const service = await startService(builderd, {
    env: {
      UNKEY_BUILDERD_PORT: "0",
      UNKEY_BUILDERD_METRICS_PORT: "0",
      UNKEY_BUILDERD_DATA_DIR: dataDir,
      UNKEY_BUILDERD_INSECURE_REGISTRIES: insecure,
    },
    logDestination: captureLogs().destination,
  });
  const token = fs.readFileSync(path.join(dataDir, "service-token"), "utf8").trim();
  return { service, token, baseUrl: `http://127.0.0.1:${service.api.port}` };
}
