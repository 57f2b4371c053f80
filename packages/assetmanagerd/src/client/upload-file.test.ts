import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { Code, ConnectError } from "@connectrpc/connect";
import { assetmanagerd as api } from "@kiln/api";
import { HEADERS } from "@kiln/kit";
import { startTestService, type TestService, tempDir } from "@kiln/kit/testing";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { assetmanagerd } from "../definition.js";
import { sha256 } from "../store/blob-store.suite.js";
import { type AssetClient, assetClient, asTenant, rpcError } from "../testing/client.js";
import { uploadAssetFile } from "./upload-file.js";

const MiB = 1024 * 1024;

describe("uploadAssetFile (over HTTP/1.1 to a running service)", () => {
  let svc: TestService;
  let c: AssetClient;
  const dir = tempDir("kiln-upload-file-");
  const endpoint = (tenant = "acme") => ({
    baseUrl: svc.baseUrl,
    headers: asTenant(svc.token, tenant).headers,
  });
  const file = (name: string, bytes: Uint8Array) => {
    const p = path.join(dir.path, name);
    fs.writeFileSync(p, bytes);
    return p;
  };
  const blobCount = () => {
    const root = path.join(svc.dataDir, "assets", "sha256");
    return fs.existsSync(root)
      ? fs.readdirSync(root).flatMap((p) => fs.readdirSync(path.join(root, p))).length
      : 0;
  };

  beforeAll(async () => {
    svc = await startTestService(assetmanagerd, {
      env: { UNKEY_ASSETMANAGERD_MAX_UPLOAD_SIZE: String(16 * MiB) },
    });
    c = assetClient(svc.baseUrl, { binary: true });
  });
  afterAll(async () => {
    await svc.stop();
    dir.remove();
  });

  it("uploads a file spanning several frames, its size and checksum declared from the file", async () => {
    // 9 MiB + 123 bytes: three 4 MiB frames, the last chunk short.
    const bytes = randomBytes(9 * MiB + 123);
    const res = await uploadAssetFile(
      endpoint(),
      { name: "big.img", type: api.AssetType.ROOTFS, labels: { k: "v" } },
      file("big.img", bytes),
    );
    expect(res.asset?.sizeBytes).toBe(BigInt(bytes.length));
    expect(res.asset?.checksum).toBe(sha256(bytes));
    expect(res.asset?.labels).toEqual({ k: "v" });
    expect(res.asset?.status).toBe(api.AssetStatus.AVAILABLE);
    expect(fs.readFileSync(res.asset!.location).equals(bytes)).toBe(true);
    const got = await c.getAsset({ id: res.asset!.id }, asTenant(svc.token, "acme"));
    expect(got.asset?.checksum).toBe(sha256(bytes));
  });

  it.each([
    [1, 5],
    [1000, 4096],
    [4 * MiB, 4 * MiB + 1],
    [256 * 1024, 1],
  ])("with %i-byte chunks, uploads %i bytes intact", async (chunkBytes, size) => {
    const bytes = randomBytes(size);
    const res = await uploadAssetFile(
      endpoint(),
      { name: "chunks.bin", type: api.AssetType.DISK_IMAGE, checksum: sha256(bytes) },
      file(`chunks-${chunkBytes}-${size}.bin`, bytes),
      { chunkBytes },
    );
    expect(res.asset?.sizeBytes).toBe(BigInt(size));
    expect(fs.readFileSync(res.asset!.location).equals(bytes)).toBe(true);
  });

  it("uploads an empty file", async () => {
    const res = await uploadAssetFile(
      endpoint(),
      { name: "empty", type: api.AssetType.DISK_IMAGE },
      file("empty", new Uint8Array(0)),
    );
    expect(res.asset?.sizeBytes).toBe(0n);
    expect(res.asset?.checksum).toBe(sha256(new Uint8Array(0)));
  });

  it("reports a checksum mismatch as the service's invalid_argument and stores nothing", async () => {
    const before = blobCount();
    const err = await rpcError(
      uploadAssetFile(
        endpoint(),
        { name: "bad.img", type: api.AssetType.ROOTFS, checksum: sha256(Buffer.from("other")) },
        file("bad.img", randomBytes(5 * MiB)),
      ),
    );
    expect(err.code).toBe(Code.InvalidArgument);
    expect(err.message).toMatch(/checksum mismatch/);
    expect(blobCount()).toBe(before);
  });

  it("stops sending when the service refuses early (over the tenant's upload limit)", async () => {
    const err = await rpcError(
      uploadAssetFile(
        endpoint(),
        { name: "huge.img", type: api.AssetType.ROOTFS },
        file("huge.img", randomBytes(40 * MiB)),
      ),
    );
    expect(err.code).toBe(Code.ResourceExhausted);
  });

  it("surfaces the service's auth failure", async () => {
    const headers = { [HEADERS.tenantId]: "acme" };
    const err = await rpcError(
      uploadAssetFile(
        { baseUrl: svc.baseUrl, headers },
        { name: "x", type: api.AssetType.ROOTFS },
        file("x", randomBytes(10)),
      ),
    );
    expect([Code.Unauthenticated, Code.PermissionDenied]).toContain(err.code);
  });

  it("is canceled by its signal, before or while it sends, and nothing is stored", async () => {
    const before = blobCount();
    const early = new AbortController();
    early.abort();
    const err = await rpcError(
      uploadAssetFile(
        endpoint(),
        { name: "c.img", type: api.AssetType.ROOTFS },
        file("c.img", randomBytes(10)),
        {
          signal: early.signal,
        },
      ),
    );
    expect(err.code).toBe(Code.Canceled);

    // While sending: once the service has reserved the asset (UPLOADING), the bytes are streaming.
    const ac = new AbortController();
    const call = rpcError(
      uploadAssetFile(
        endpoint("cancel"),
        { name: "d.img", type: api.AssetType.ROOTFS },
        file("d.img", randomBytes(15 * MiB)),
        {
          signal: ac.signal,
        },
      ),
    );
    const uploading = async () =>
      (await c.listAssets({ status: api.AssetStatus.UPLOADING }, asTenant(svc.token, "cancel"))).assets
        .length > 0;
    while (!(await uploading())) await new Promise((r) => setTimeout(r, 1));
    ac.abort();
    expect((await call).code).toBe(Code.Canceled);
    // The service notices the hang-up and removes the reservation and the ingest.
    for (let i = 0; i < 200 && (await uploading()); i++) await new Promise((r) => setTimeout(r, 10));
    expect(await uploading()).toBe(false);
    expect((await c.listAssets({}, asTenant(svc.token, "cancel"))).assets).toEqual([]);
    expect(blobCount()).toBe(before);
  });

  it("gives deadline_exceeded past its timeout, and nothing is stored", async () => {
    const before = blobCount();
    const err = await rpcError(
      uploadAssetFile(
        endpoint(),
        { name: "slow.img", type: api.AssetType.ROOTFS },
        file("slow.img", randomBytes(15 * MiB)),
        { timeoutMs: 5 },
      ),
    );
    expect(err.code).toBe(Code.DeadlineExceeded);
    expect(blobCount()).toBe(before);
  });

  it("is unavailable when nothing listens", async () => {
    const err = await rpcError(
      uploadAssetFile(
        { baseUrl: "http://127.0.0.1:9" },
        { name: "x", type: api.AssetType.ROOTFS },
        file("y", randomBytes(10)),
      ),
    );
    expect(err).toBeInstanceOf(ConnectError);
    expect(err.code).toBe(Code.Unavailable);
  });

  it("throws the file's own error, before calling the service", async () => {
    await expect(
      uploadAssetFile(endpoint(), { name: "x", type: api.AssetType.ROOTFS }, path.join(dir.path, "missing")),
    ).rejects.toMatchObject({ code: "ENOENT" });
  });

  it("refuses a chunk size the proto does not allow", async () => {
    await expect(
      uploadAssetFile(endpoint(), { name: "x", type: api.AssetType.ROOTFS }, file("z", randomBytes(10)), {
        chunkBytes: 4 * MiB + 1,
      }),
    ).rejects.toThrow(RangeError);
  });
});
