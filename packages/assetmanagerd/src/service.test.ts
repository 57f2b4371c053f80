import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { HeadObjectCommand, PutObjectCommand, S3Client } from "@aws-sdk/client-s3";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";
import { assetmanagerd as api, BuilderService, builderd } from "@kiln/api";
import { HEADERS, notImplemented } from "@kiln/kit";
import { createTestPostgres, startTestService, type TestService, tempDir } from "@kiln/kit/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { assetmanagerd } from "./definition.js";
import { sha256 } from "./store/blob-store.suite.js";
import { type AssetClient, assetClient, asTenant, rpcError, uploadStream } from "./testing/client.js";
import { S3RVER_CREDENTIALS, startTestS3, type TestS3 } from "./testing/s3rver.js";

const T = api.AssetType;

function blobFiles(svc: TestService): string[] {
  const root = path.join(svc.dataDir, "assets", "sha256");
  if (!fs.existsSync(root)) return [];
  return fs.readdirSync(root).flatMap((p) => fs.readdirSync(path.join(root, p)));
}

async function metricsText(svc: TestService): Promise<string> {
  return (await fetch(`${svc.baseUrl}/metrics`)).text();
}

/** A BuilderService stand-in (builderd's CreateBuild is not implemented yet): records calls. */
function fakeBuilderd(answer: (req: builderd.CreateBuildRequest) => builderd.BuildState | ConnectError) {
  const calls: Array<{ tenant: string | null; tier: string | null; req: builderd.CreateBuildRequest }> = [];
  const transport = createRouterTransport((router) => {
    router.service(BuilderService, {
      ...notImplemented(BuilderService, "test double"),
      async createBuild(req, ctx) {
        calls.push({
          tenant: ctx.requestHeader.get(HEADERS.tenantId),
          tier: ctx.requestHeader.get(HEADERS.tenantTier),
          req,
        });
        const state = answer(req);
        if (state instanceof ConnectError) throw state;
        return { buildId: `bld_${calls.length}`, state };
      },
    });
  });
  return { transport, calls };
}

describe("assetmanagerd service (local storage, SQLite)", () => {
  let svc: TestService;
  let c: AssetClient;
  let bin: AssetClient;
  let h2: AssetClient;
  const builder = fakeBuilderd((req) => {
    const source = req.config?.source?.sourceType;
    return source?.case === "dockerImage" && source.value.imageUri === "bad image"
      ? new ConnectError("bad ref", Code.InvalidArgument)
      : builderd.BuildState.PENDING;
  });
  const acme = () => asTenant(svc.token, "acme");
  const globex = () => asTenant(svc.token, "globex");

  beforeAll(async () => {
    svc = await startTestService(assetmanagerd, {
      env: { UNKEY_ASSETMANAGERD_MAX_UPLOAD_SIZE: String(8 * 1024 * 1024) },
      peerTransport: () => builder.transport,
    });
    c = assetClient(svc.baseUrl);
    bin = assetClient(svc.baseUrl, { binary: true });
    h2 = assetClient(svc.baseUrl, { binary: true, http2: true });
  });
  afterAll(async () => {
    await svc.stop();
  });

  it("uploads, gets and lists an asset with its metadata", async () => {
    const bytes = randomBytes(3 * 1024 * 1024 + 17);
    const res = await h2.uploadAsset(
      uploadStream(
        {
          name: "nginx-rootfs.ext4",
          type: T.ROOTFS,
          sizeBytes: BigInt(bytes.length),
          checksum: sha256(bytes),
          labels: { docker_image: "docker.io/library/nginx:1.27", app: "web" },
          sourceImage: "docker.io/library/nginx:1.27",
          buildId: "bld_abc",
          imageConfig: {
            entrypoint: ["/docker-entrypoint.sh"],
            command: ["nginx"],
            env: { A: "1" },
            exposedPorts: ["80/tcp"],
          },
        },
        bytes,
      ),
      acme(),
    );
    expect(res.deduplicated).toBe(false);
    const a = res.asset!;
    expect(a).toMatchObject({
      tenantId: "acme",
      type: T.ROOTFS,
      status: api.AssetStatus.AVAILABLE,
      backend: api.StorageBackend.LOCAL,
      sizeBytes: BigInt(bytes.length),
      checksum: sha256(bytes),
      buildId: "bld_abc",
      createdBy: "internal",
    });
    expect(a.location).toBe(
      path.join(svc.dataDir, "assets", "sha256", a.checksum.slice(7, 9), a.checksum.slice(7)),
    );
    expect(a.imageConfig?.command).toEqual(["nginx"]);
    expect(a.imageConfig?.env).toEqual({ A: "1" });
    expect(fs.readFileSync(a.location).equals(bytes)).toBe(true);

    const got = await c.getAsset({ id: a.id }, acme());
    expect(got.asset).toEqual(a);
    const listed = await c.listAssets({ type: T.ROOTFS, labelSelector: { app: "web" } }, acme());
    expect(listed.assets.map((x) => x.id)).toEqual([a.id]);
    expect(listed.totalCount).toBe(1);
  });

  it("answers invalid_argument when metadata is not first or comes twice", async () => {
    async function* chunkFirst() {
      yield { data: { case: "chunk" as const, value: new Uint8Array([1]) } };
    }
    const e1 = await rpcError(c.uploadAsset(chunkFirst(), acme()));
    expect(e1.code).toBe(Code.InvalidArgument);
    expect(e1.rawMessage).toMatch(/first UploadAssetRequest must carry metadata/);
    async function* twice() {
      yield* uploadStream({ name: "a", type: T.KERNEL }, new Uint8Array([1]));
      yield { data: { case: "metadata" as const, value: { name: "b", type: T.KERNEL } } };
    }
    const e2 = await rpcError(c.uploadAsset(twice(), acme()));
    expect(e2.code).toBe(Code.InvalidArgument);
    expect((await c.listAssets({ status: api.AssetStatus.UPLOADING }, acme())).totalCount).toBe(0);
  });

  it("validates requests at the edge, naming the field", async () => {
    const bad = await rpcError(
      c.uploadAsset(uploadStream({ name: "../../etc/passwd", type: T.KERNEL }, new Uint8Array([1])), acme()),
    );
    expect(bad.code).toBe(Code.InvalidArgument);
    expect(bad.rawMessage).toMatch(/name/);
    const noType = await rpcError(c.uploadAsset(uploadStream({ name: "k" }, new Uint8Array([1])), acme()));
    expect(noType.code).toBe(Code.InvalidArgument);
    expect(noType.rawMessage).toMatch(/type/);
    const target = await rpcError(c.prepareAssets({ assetIds: ["ast_x"], targetPath: "../escape" }, acme()));
    expect(target.code).toBe(Code.InvalidArgument);
    expect(target.rawMessage).toMatch(/target_path/);
  });

  it("rejects a checksum mismatch with invalid_argument and keeps nothing", async () => {
    const before = blobFiles(svc).length;
    const bytes = randomBytes(100_000);
    const err = await rpcError(
      c.uploadAsset(
        uploadStream({ name: "k", type: T.KERNEL, checksum: sha256(Buffer.from("x")) }, bytes, 10_000),
        acme(),
      ),
    );
    expect(err.code).toBe(Code.InvalidArgument);
    expect(err.rawMessage).toMatch(/checksum mismatch/);
    expect(blobFiles(svc).length).toBe(before);
    expect((await c.listAssets({ status: api.AssetStatus.UPLOADING }, acme())).totalCount).toBe(0);
    expect(fs.readdirSync(path.join(svc.dataDir, "assets", "ingest"))).toEqual([]);
  });

  it("answers resource_exhausted over the maximum upload size", async () => {
    const declared = await rpcError(
      c.uploadAsset(
        uploadStream({ name: "big", type: T.DISK_IMAGE, sizeBytes: 9n * 1024n * 1024n }, new Uint8Array(0)),
        acme(),
      ),
    );
    expect(declared.code).toBe(Code.ResourceExhausted);
    const streamed = await rpcError(
      bin.uploadAsset(
        uploadStream({ name: "big", type: T.DISK_IMAGE }, randomBytes(9 * 1024 * 1024)),
        acme(),
      ),
    );
    expect(streamed.code).toBe(Code.ResourceExhausted);
    expect(streamed.rawMessage).toMatch(/exceeds the 8388608-byte limit/);
    expect(fs.readdirSync(path.join(svc.dataDir, "assets", "ingest"))).toEqual([]);
  });

  it("stores identical content uploaded concurrently once", async () => {
    const bytes = randomBytes(2 * 1024 * 1024);
    const before = blobFiles(svc).length;
    const results = await Promise.all(
      Array.from({ length: 6 }, (_, i) =>
        bin.uploadAsset(
          uploadStream({ name: `same-${i}`, type: T.DISK_IMAGE }, bytes, 256 * 1024),
          i % 2 ? acme() : globex(),
        ),
      ),
    );
    expect(results.filter((r) => !r.deduplicated)).toHaveLength(1);
    expect(new Set(results.map((r) => r.asset!.location)).size).toBe(1);
    expect(blobFiles(svc).length).toBe(before + 1);
  });

  it("answers not_found for another tenant's asset, never permission_denied", async () => {
    const { asset } = await c.uploadAsset(
      uploadStream({ name: "private", type: T.KERNEL }, Buffer.from("acme only")),
      acme(),
    );
    const id = asset!.id;
    const lease = await c.acquireAsset({ assetId: id, holder: "vm:a" }, acme());
    for (const call of [
      c.getAsset({ id }, globex()),
      c.acquireAsset({ assetId: id, holder: "vm:g" }, globex()),
      c.deleteAsset({ id, force: true }, globex()),
      c.prepareAssets({ assetIds: [id], targetPath: "vm_g" }, globex()),
      c.registerAsset({ name: "steal", type: T.KERNEL, location: asset!.checksum }, globex()),
    ]) {
      const err = await rpcError(call);
      expect(err.code).toBe(Code.NotFound);
    }
    expect((await c.releaseAsset({ leaseId: lease.leaseId }, globex())).success).toBe(false);
    expect((await c.getAsset({ id }, acme())).asset?.referenceCount).toBe(1);
    expect((await c.listAssets({}, globex())).assets.some((a) => a.id === id)).toBe(false);
  });

  it("registers stored content and host files from the import directory", async () => {
    const bytes = randomBytes(40_000);
    const { asset } = await c.uploadAsset(uploadStream({ name: "orig", type: T.ROOTFS }, bytes), acme());
    const alias = await c.registerAsset(
      { name: "alias", type: T.ROOTFS, location: asset!.checksum, labels: { v: "2" } },
      acme(),
    );
    expect(alias.asset).toMatchObject({
      checksum: asset!.checksum,
      status: api.AssetStatus.AVAILABLE,
      labels: { v: "2" },
    });

    // builderd's output lives under <data dir>/tenants, the default import directory.
    const file = path.join(svc.dataDir, "tenants", "acme", "builds", "bld_1", "rootfs.ext4");
    fs.mkdirSync(path.dirname(file), { recursive: true });
    const built = randomBytes(50_000);
    fs.writeFileSync(file, built);
    const reg = await c.registerAsset(
      { name: "rootfs.ext4", type: T.ROOTFS, location: file, checksum: sha256(built), buildId: "bld_1" },
      acme(),
    );
    expect(reg.asset).toMatchObject({ checksum: sha256(built), sizeBytes: 50_000n, buildId: "bld_1" });
    const outside = await rpcError(
      c.registerAsset({ name: "x", type: T.ROOTFS, location: "/etc/passwd" }, acme()),
    );
    expect(outside.code).toBe(Code.InvalidArgument);
    expect(outside.rawMessage).toMatch(/outside the directories assets may be imported from/);
  });

  it("pages through ListAssets with page tokens", async () => {
    for (let i = 0; i < 5; i++) {
      await c.uploadAsset(
        uploadStream(
          { name: `page-${i}`, type: T.INITRD, labels: { batch: "paging" } },
          Buffer.from(`p${i}`),
        ),
        acme(),
      );
    }
    const seen: string[] = [];
    let pageToken = "";
    let pages = 0;
    do {
      const page = await c.listAssets({ labelSelector: { batch: "paging" }, pageSize: 2, pageToken }, acme());
      expect(page.totalCount).toBe(5);
      seen.push(...page.assets.map((a) => a.name));
      pageToken = page.nextPageToken;
      pages++;
    } while (pageToken);
    expect(pages).toBe(3);
    expect(seen).toEqual(["page-4", "page-3", "page-2", "page-1", "page-0"]);
  });

  it("leases: delete refused while leased, force ends leases, release is idempotent", async () => {
    const { asset } = await c.uploadAsset(
      uploadStream({ name: "leased", type: T.KERNEL }, Buffer.from("lease me")),
      acme(),
    );
    const id = asset!.id;
    const l = await c.acquireAsset({ assetId: id, holder: "vm:vm_1", ttlSeconds: 600n }, acme());
    expect(l.lease?.holder).toBe("vm:vm_1");
    expect(timestampMs(l.lease!.expiresAt!) - timestampMs(l.lease!.acquiredAt!)).toBe(600_000);
    const refused = await rpcError(c.deleteAsset({ id }, acme()));
    expect(refused.code).toBe(Code.FailedPrecondition);
    expect(refused.rawMessage).toMatch(/vm:vm_1/);
    await c.acquireAsset({ assetId: id, holder: "vm:vm_2" }, acme());
    // A lease id the caller chose: taken once, returned again, refused in another form.
    const mine = { assetId: id, holder: "vm:vm_3", leaseId: "lse_vm3_rootfs" };
    expect((await c.acquireAsset(mine, acme())).leaseId).toBe("lse_vm3_rootfs");
    expect((await c.acquireAsset(mine, acme())).lease?.holder).toBe("vm:vm_3");
    expect((await rpcError(c.acquireAsset({ ...mine, holder: "vm:vm_4" }, acme()))).code).toBe(
      Code.AlreadyExists,
    );
    const badId = await rpcError(c.acquireAsset({ ...mine, leaseId: "vm3" }, acme()));
    expect(badId.code).toBe(Code.InvalidArgument);
    expect(badId.rawMessage).toMatch(/lease_id/);
    expect((await c.getAsset({ id }, acme())).asset?.referenceCount).toBe(3);
    expect((await c.releaseAsset({ leaseId: l.leaseId }, acme())).success).toBe(true);
    expect((await c.releaseAsset({ leaseId: l.leaseId }, acme())).success).toBe(false);
    expect((await c.deleteAsset({ id, force: true }, acme())).success).toBe(true);
    expect((await rpcError(c.getAsset({ id }, acme()))).code).toBe(Code.NotFound);
  });

  it("expires a lease, then garbage-collects the asset and its blob", async () => {
    const bytes = randomBytes(30_000);
    const { asset } = await c.uploadAsset(
      uploadStream({ name: "short-lived", type: T.DISK_IMAGE }, bytes),
      globex(),
    );
    await c.acquireAsset({ assetId: asset!.id, holder: "vm:tmp", ttlSeconds: 1n }, globex());
    const gc = { deleteUnreferenced: true, maxAgeSeconds: 1n };
    expect((await c.garbageCollect(gc, globex())).deletedAssets.map((a) => a.id)).not.toContain(asset!.id);
    await new Promise((r) => setTimeout(r, 1_200));
    // Expired: the lease no longer counts; retention runs from the lease's end.
    expect((await c.getAsset({ id: asset!.id }, globex())).asset?.referenceCount).toBe(0);
    await new Promise((r) => setTimeout(r, 1_100));
    const dry = await c.garbageCollect({ ...gc, dryRun: true }, globex());
    expect(dry.deletedAssets.map((a) => a.id)).toContain(asset!.id);
    expect(fs.existsSync(asset!.location)).toBe(true);
    const res = await c.garbageCollect(gc, globex());
    expect(res.leasesExpired).toBe(1);
    expect(res.deletedAssets.map((a) => a.id)).toContain(asset!.id);
    expect(res.bytesFreed).toBeGreaterThanOrEqual(30_000n);
    expect(fs.existsSync(asset!.location)).toBe(false);
    expect(await metricsText(svc)).toMatch(/assetmanagerd_gc_deleted_total\{kind="asset"\} [1-9]/);
  });

  it("prepares assets into the VM root with stable names, hard-linked", async () => {
    const kernel = await c.uploadAsset(
      uploadStream({ name: "vmlinuz-6.1", type: T.KERNEL }, Buffer.from("kernel image")),
      acme(),
    );
    const initrd = await c.uploadAsset(
      uploadStream({ name: "initrd.img", type: T.INITRD }, Buffer.from("initramfs")),
      acme(),
    );
    const disk = await c.uploadAsset(
      uploadStream({ name: "data.img", type: T.DISK_IMAGE }, Buffer.from("disk")),
      acme(),
    );
    const ids = [kernel.asset!.id, initrd.asset!.id, disk.asset!.id];
    const res = await c.prepareAssets(
      { assetIds: ids, targetPath: "vm_1/root/assets", preparedFor: "vm:vm_1" },
      acme(),
    );
    const dir = path.join(fs.realpathSync(svc.dataDir), "vms", "vm_1", "root", "assets");
    expect(res.assetPaths).toEqual({
      [ids[0]!]: path.join(dir, "vmlinux"),
      [ids[1]!]: path.join(dir, "initrd"),
      [ids[2]!]: path.join(dir, "data.img"),
    });
    expect(fs.statSync(path.join(dir, "vmlinux")).ino).toBe(fs.statSync(kernel.asset!.location).ino);

    fs.symlinkSync("/tmp", path.join(svc.dataDir, "vms", "evil"));
    const err = await rpcError(c.prepareAssets({ assetIds: ids, targetPath: "evil/x" }, acme()));
    expect(err.code).toBe(Code.InvalidArgument);
    expect(err.rawMessage).toMatch(/symlink/);
  });

  it("queries assets and starts a build for a missing rootfs without waiting", async () => {
    const res = await c.queryAssets(
      {
        type: T.ROOTFS,
        labelSelector: { docker_image: "ghcr.io/acme/api:2" },
        buildOptions: {
          enableAutoBuild: true,
          dockerImage: "ghcr.io/acme/api:2",
          suggestedAssetId: "ast_api2",
        },
      },
      acme(),
    );
    expect(res.assets).toEqual([]);
    expect(res.triggeredBuilds).toEqual([
      expect.objectContaining({
        buildId: "bld_1",
        dockerImage: "ghcr.io/acme/api:2",
        status: "BUILD_STATE_PENDING",
      }),
    ]);
    const call = builder.calls[0]!;
    expect(call.tenant).toBe("acme");
    expect(call.tier).toBe("pro");
    expect(call.req.config?.source?.sourceType).toEqual({
      case: "dockerImage",
      value: expect.objectContaining({ imageUri: "ghcr.io/acme/api:2" }),
    });
    expect(call.req.config?.labels).toEqual({ docker_image: "ghcr.io/acme/api:2" });
    expect(call.req.config?.suggestedAssetId).toBe("ast_api2");
    expect(call.req.idempotencyKey).toMatch(/^auto-build:/);

    // Without enable_auto_build nothing is started; with a rootfs present neither.
    await c.queryAssets({ buildOptions: { dockerImage: "ghcr.io/acme/api:2" } }, acme());
    await c.uploadAsset(
      uploadStream(
        { name: "api", type: T.ROOTFS, labels: { docker_image: "ghcr.io/acme/api:2" } },
        Buffer.from("r"),
      ),
      acme(),
    );
    const found = await c.queryAssets(
      { type: T.ROOTFS, buildOptions: { enableAutoBuild: true, dockerImage: "ghcr.io/acme/api:2" } },
      acme(),
    );
    expect(found.triggeredBuilds).toEqual([]);
    expect(builder.calls).toHaveLength(1);

    const refused = await rpcError(
      c.queryAssets({ buildOptions: { enableAutoBuild: true, dockerImage: "bad image" } }, acme()),
    );
    expect(refused.code).toBe(Code.InvalidArgument);
    expect(refused.rawMessage).toMatch(/builderd could not start a build of bad image: bad ref/);
  });

  it("exports its metrics", async () => {
    const text = await metricsText(svc);
    expect(text).toMatch(/assetmanagerd_assets\{type="rootfs"\} [1-9]/);
    expect(text).toMatch(/assetmanagerd_assets\{type="kernel"\} \d+/);
    expect(text).toMatch(/assetmanagerd_storage_bytes [1-9]\d*/);
    expect(text).toMatch(/assetmanagerd_leases_active \d+/);
    expect(text).toMatch(/assetmanagerd_rpc_requests_total\{method="UploadAsset",code="ok"\}/);
  });
});

describe("assetmanagerd service: PrepareAssets onto another filesystem", () => {
  it("copies into a VM root on a tmpfs", async () => {
    const mnt = tempDir("kiln-vmroot-");
    execFileSync("mount", ["-t", "tmpfs", "-o", "size=32m", "tmpfs", mnt.path]);
    try {
      const svc = await startTestService(assetmanagerd, { env: { UNKEY_ASSETMANAGERD_VM_ROOT: mnt.path } });
      try {
        const c = assetClient(svc.baseUrl);
        const bytes = randomBytes(500_000);
        const { asset } = await c.uploadAsset(
          uploadStream({ name: "r", type: T.ROOTFS }, bytes),
          asTenant(svc.token, "acme"),
        );
        const res = await c.prepareAssets(
          { assetIds: [asset!.id], targetPath: "vm_9" },
          asTenant(svc.token, "acme"),
        );
        const placed = res.assetPaths[asset!.id]!;
        expect(placed).toBe(path.join(mnt.path, "vm_9", "rootfs.ext4"));
        expect(fs.readFileSync(placed).equals(bytes)).toBe(true);
        expect(fs.statSync(placed).dev).not.toBe(fs.statSync(asset!.location).dev);
        expect(svc.logs.find((l) => l.msg === "assets prepared")).toMatchObject({ methods: ["copy"] });
      } finally {
        await svc.stop();
      }
    } finally {
      execFileSync("umount", [mnt.path]);
      mnt.remove();
    }
  });
});

describe("assetmanagerd service on PostgreSQL", () => {
  it("uploads, dedupes, leases, prepares and deletes", async () => {
    const pg = await createTestPostgres();
    try {
      const svc = await startTestService(assetmanagerd, {
        env: { UNKEY_ASSETMANAGERD_DATABASE_URL: pg.url },
      });
      try {
        const c = assetClient(svc.baseUrl, { binary: true });
        const bytes = randomBytes(100_000);
        const a = await c.uploadAsset(
          uploadStream({ name: "r", type: T.ROOTFS }, bytes),
          asTenant(svc.token, "acme"),
        );
        const b = await c.uploadAsset(
          uploadStream({ name: "r", type: T.ROOTFS }, bytes),
          asTenant(svc.token, "globex"),
        );
        expect([a.deduplicated, b.deduplicated]).toEqual([false, true]);
        const lease = await c.acquireAsset(
          { assetId: a.asset!.id, holder: "vm:1" },
          asTenant(svc.token, "acme"),
        );
        expect(
          (await c.getAsset({ id: a.asset!.id }, asTenant(svc.token, "acme"))).asset?.referenceCount,
        ).toBe(1);
        const prepared = await c.prepareAssets(
          { assetIds: [a.asset!.id], targetPath: "vm_1" },
          asTenant(svc.token, "acme"),
        );
        expect(fs.readFileSync(prepared.assetPaths[a.asset!.id]!).equals(bytes)).toBe(true);
        expect((await rpcError(c.deleteAsset({ id: a.asset!.id }, asTenant(svc.token, "acme")))).code).toBe(
          Code.FailedPrecondition,
        );
        await c.releaseAsset({ leaseId: lease.leaseId }, asTenant(svc.token, "acme"));
        await c.deleteAsset({ id: a.asset!.id }, asTenant(svc.token, "acme"));
        expect(blobFiles(svc)).toHaveLength(1); // globex still uses it
        await c.deleteAsset({ id: b.asset!.id }, asTenant(svc.token, "globex"));
        expect(blobFiles(svc)).toHaveLength(0);
      } finally {
        await svc.stop();
      }
    } finally {
      await pg.drop();
    }
  });
});

describe("assetmanagerd service on S3 (s3rver)", () => {
  let s3: TestS3;
  let svc: TestService;
  let c: AssetClient;
  const rawS3 = () =>
    new S3Client({
      endpoint: s3.endpoint,
      region: "us-east-1",
      forcePathStyle: true,
      credentials: S3RVER_CREDENTIALS,
    });
  async function objectExists(key: string): Promise<boolean> {
    const raw = rawS3();
    try {
      await raw.send(new HeadObjectCommand({ Bucket: s3.bucket, Key: key }));
      return true;
    } catch (err) {
      if ((err as { name?: string }).name === "NotFound") return false;
      throw err;
    } finally {
      raw.destroy();
    }
  }
  beforeAll(async () => {
    s3 = await startTestS3();
    svc = await startTestService(assetmanagerd, { env: s3.env });
    c = assetClient(svc.baseUrl, { binary: true, http2: true });
  });
  afterAll(async () => {
    await svc?.stop();
    await s3?.stop();
  });

  it("stores uploads as objects, dedupes, downloads on prepare and deletes unreferenced blobs", async () => {
    const bytes = randomBytes(11 * 1024 * 1024 + 5); // three 5 MiB parts
    const a = await c.uploadAsset(
      uploadStream({ name: "rootfs", type: T.ROOTFS, checksum: sha256(bytes) }, bytes),
      asTenant(svc.token, "acme"),
    );
    expect(a.asset).toMatchObject({ backend: api.StorageBackend.S3, checksum: sha256(bytes) });
    const hex = sha256(bytes).slice(7);
    expect(a.asset!.location).toBe(`s3://${s3.bucket}/sha256/${hex.slice(0, 2)}/${hex}`);
    const b = await c.uploadAsset(
      uploadStream({ name: "rootfs", type: T.ROOTFS }, bytes),
      asTenant(svc.token, "globex"),
    );
    expect(b.deduplicated).toBe(true);

    const prepared = await c.prepareAssets(
      { assetIds: [a.asset!.id], targetPath: "vm_s3" },
      asTenant(svc.token, "acme"),
    );
    expect(fs.readFileSync(prepared.assetPaths[a.asset!.id]!).equals(bytes)).toBe(true);

    const mismatch = await rpcError(
      c.uploadAsset(
        uploadStream(
          { name: "bad", type: T.KERNEL, checksum: sha256(Buffer.from("no")) },
          randomBytes(6 * 1024 * 1024),
        ),
        asTenant(svc.token, "acme"),
      ),
    );
    expect(mismatch.code).toBe(Code.InvalidArgument);

    const key = `sha256/${hex.slice(0, 2)}/${hex}`;
    await c.deleteAsset({ id: a.asset!.id }, asTenant(svc.token, "acme"));
    expect(await objectExists(key)).toBe(true); // globex still uses it
    await c.deleteAsset({ id: b.asset!.id }, asTenant(svc.token, "globex"));
    expect(await objectExists(key)).toBe(false);
    const ready = await fetch(`${svc.baseUrl}/health/ready`);
    expect(await ready.json()).toMatchObject({ checks: { storage: { ok: true } } });
  });

  it("registers an s3:// object by reading it into the store", async () => {
    const raw = rawS3();
    try {
      const bytes = randomBytes(20_000);
      await raw.send(new PutObjectCommand({ Bucket: s3.bucket, Key: "incoming/kernel", Body: bytes }));
      const res = await c.registerAsset(
        {
          name: "vmlinuz",
          type: T.KERNEL,
          backend: api.StorageBackend.S3,
          location: `s3://${s3.bucket}/incoming/kernel`,
        },
        asTenant(svc.token, "acme"),
      );
      expect(res.asset).toMatchObject({
        checksum: sha256(bytes),
        sizeBytes: 20_000n,
        backend: api.StorageBackend.S3,
      });
    } finally {
      raw.destroy();
    }
  });
});
