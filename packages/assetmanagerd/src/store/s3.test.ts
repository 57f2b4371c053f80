import { PutObjectCommand, S3Client } from "@aws-sdk/client-s3";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { S3RVER_CREDENTIALS, startTestS3, type TestS3 } from "../testing/s3rver.js";
import { blobStoreSuite, MiB, readAll } from "./blob-store.suite.js";
import { createS3BlobStore } from "./s3.js";

let s3: TestS3;
let run = 0;
beforeAll(async () => {
  s3 = await startTestS3();
});
afterAll(async () => {
  await s3.stop();
});

function open(prefix: string) {
  return createS3BlobStore({
    endpoint: s3.endpoint,
    region: "us-east-1",
    bucket: s3.bucket,
    prefix,
    credentials: S3RVER_CREDENTIALS,
    partSize: 5 * MiB,
  });
}

function rawClient() {
  return new S3Client({
    endpoint: s3.endpoint,
    region: "us-east-1",
    forcePathStyle: true,
    credentials: S3RVER_CREDENTIALS,
  });
}

blobStoreSuite("s3 (s3rver)", async () => {
  // A fresh key prefix per case keeps cases apart in one bucket.
  const prefix = `case-${++run}/`;
  const store = open(prefix);
  const raw = rawClient();
  return {
    store,
    reopen: async () => open(prefix),
    async plantLeftover(ref, bytes) {
      await raw.send(new PutObjectCommand({ Bucket: s3.bucket, Key: `${prefix}ingest/${ref}`, Body: bytes }));
    },
    async leftovers() {
      const { ListObjectsV2Command } = await import("@aws-sdk/client-s3");
      const res = await raw.send(new ListObjectsV2Command({ Bucket: s3.bucket, Prefix: `${prefix}ingest/` }));
      return (res.Contents ?? []).map((o) => o.Key!.slice(`${prefix}ingest/`.length));
    },
    async teardown() {
      await store.close();
      raw.destroy();
    },
  };
});

describe("s3 blob store", () => {
  it("names blobs s3://bucket/<prefix>sha256/ab/<hex> and answers readiness", async () => {
    const store = open("layout/");
    try {
      await store.ping();
      const w = await store.ingest("r");
      await w.write(Buffer.from("x"));
      const { digest } = await w.commit();
      const hex = digest.slice("sha256:".length);
      expect(store.location(digest)).toBe(`s3://${s3.bucket}/layout/sha256/${hex.slice(0, 2)}/${hex}`);
      expect(store.localPath(digest)).toBeUndefined();
      const obj = await store.openObject(store.location(digest));
      expect((await readAll(obj.body)).toString()).toBe("x");
    } finally {
      await store.close();
    }
  });

  it("fails readiness with unavailable naming the bucket when it does not exist", async () => {
    const store = createS3BlobStore({
      endpoint: s3.endpoint,
      region: "us-east-1",
      bucket: "no-such-bucket",
      prefix: "",
      credentials: S3RVER_CREDENTIALS,
      partSize: 5 * MiB,
    });
    try {
      await expect(store.ping()).rejects.toThrow(/no-such-bucket/);
    } finally {
      await store.close();
    }
  });
});
