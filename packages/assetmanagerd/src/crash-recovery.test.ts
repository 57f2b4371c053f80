import { createHash, randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { Code } from "@connectrpc/connect";
import { assetmanagerd as api } from "@kiln/api";
import { tempDir } from "@kiln/kit/testing";
import { expect, it } from "vitest";
import { sha256 } from "./store/blob-store.suite.js";
import { assetClient, asTenant, rpcError, uploadStream } from "./testing/client.js";
import { type ChildService, spawnAssetmanagerd } from "./testing/process.js";

const MiB = 1024 * 1024;

async function waitFor(
  what: string,
  check: () => Promise<boolean> | boolean,
  timeoutMs = 20_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

it("after kill -9 mid-upload and a restart, no orphan is visible and no blob is corrupt", {
  timeout: 120_000,
}, async () => {
  const dir = tempDir("kiln-crash-");
  const ingestDir = path.join(dir.path, "assets", "ingest");
  const blobsDir = path.join(dir.path, "assets", "sha256");
  let svc: ChildService | undefined;
  try {
    svc = await spawnAssetmanagerd({ dataDir: dir.path });
    let c = assetClient(svc.baseUrl, { binary: true });
    let as = asTenant(svc.token, "acme");

    const kept = randomBytes(3 * MiB);
    const done = await c.uploadAsset(uploadStream({ name: "kept", type: api.AssetType.KERNEL }, kept), as);

    // An upload that stops after 4 of 16 MiB and never ends.
    const bytes = randomBytes(16 * MiB);
    let unblock!: () => void;
    const blocked = new Promise<void>((r) => (unblock = r));
    async function* partial() {
      yield {
        data: {
          case: "metadata" as const,
          value: {
            id: "ast_partial",
            name: "rootfs.ext4",
            type: api.AssetType.ROOTFS,
            sizeBytes: BigInt(bytes.length),
            checksum: sha256(bytes),
          },
        },
      };
      for (let o = 0; o < 4 * MiB; o += MiB)
        yield { data: { case: "chunk" as const, value: bytes.subarray(o, o + MiB) } };
      await blocked;
    }
    const inFlight = c.uploadAsset(partial(), as).catch((e: unknown) => e);
    const ingestFile = path.join(ingestDir, "asset-ast_partial");
    await waitFor("the partial upload to reach the server's disk", async () => {
      const uploading = await c.listAssets({ status: api.AssetStatus.UPLOADING }, as);
      return (
        uploading.totalCount === 1 && fs.existsSync(ingestFile) && fs.statSync(ingestFile).size >= 4 * MiB
      );
    });
    expect((await c.getAsset({ id: "ast_partial" }, as)).asset?.status).toBe(api.AssetStatus.UPLOADING);

    process.kill(svc.pid, "SIGKILL");
    await svc.kill("SIGKILL"); // waits for the exit
    unblock();
    expect(await inFlight).toBeInstanceOf(Error);
    // What the crash left behind (so the checks below are not vacuous).
    expect(fs.readdirSync(ingestDir)).toEqual(["asset-ast_partial"]);

    svc = await spawnAssetmanagerd({ dataDir: dir.path });
    c = assetClient(svc.baseUrl, { binary: true });
    as = asTenant(svc.token, "acme");

    // No orphan is visible: the interrupted upload is gone, in every listing and by id.
    expect((await c.listAssets({ status: api.AssetStatus.UPLOADING }, as)).totalCount).toBe(0);
    expect((await rpcError(c.getAsset({ id: "ast_partial" }, as))).code).toBe(Code.NotFound);
    const available = await c.listAssets({}, as);
    expect(available.assets.map((a) => a.id)).toEqual([done.asset!.id]);
    expect(fs.readdirSync(ingestDir)).toEqual([]);
    expect(svc.logs.some((l) => l.msg === "interrupted uploads removed")).toBe(true);

    // No corrupt blob: every stored blob's content hashes to its name.
    const blobs = fs
      .readdirSync(blobsDir)
      .flatMap((p) => fs.readdirSync(path.join(blobsDir, p)).map((f) => path.join(blobsDir, p, f)));
    expect(blobs).toHaveLength(1);
    for (const file of blobs) {
      expect(createHash("sha256").update(fs.readFileSync(file)).digest("hex")).toBe(path.basename(file));
    }
    expect(fs.readFileSync(done.asset!.location).equals(kept)).toBe(true);

    // The id is free again and the whole upload now goes through.
    const again = await c.uploadAsset(
      uploadStream(
        { id: "ast_partial", name: "rootfs.ext4", type: api.AssetType.ROOTFS, checksum: sha256(bytes) },
        bytes,
      ),
      as,
    );
    expect(again.asset?.status).toBe(api.AssetStatus.AVAILABLE);
  } finally {
    await svc?.kill("SIGKILL");
    dir.remove();
  }
});
