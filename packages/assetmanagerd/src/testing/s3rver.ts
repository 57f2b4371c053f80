import { tempDir } from "@kiln/kit/testing";
import S3rver from "s3rver";

/** s3rver's fixed credentials (it checks signatures against them). */
export const S3RVER_CREDENTIALS = { accessKeyId: "S3RVER", secretAccessKey: "S3RVER" };

export interface TestS3 {
  endpoint: string;
  bucket: string;
  /** UNKEY_ASSETMANAGERD_* settings that point the service at this server. */
  env: Record<string, string>;
  stop(): Promise<void>;
}

/**
 * An in-process S3 server (s3rver) on a free loopback port with one empty bucket, storing its
 * objects in a temporary directory that `stop()` removes.
 */
export async function startTestS3(bucket = "kiln-test"): Promise<TestS3> {
  const dir = tempDir("kiln-s3rver-");
  const server = new S3rver({
    address: "127.0.0.1",
    port: 0,
    silent: true,
    directory: dir.path,
    configureBuckets: [{ name: bucket }],
  });
  let address: { port: number };
  try {
    address = await server.run();
  } catch (err) {
    dir.remove();
    throw err;
  }
  const endpoint = `http://127.0.0.1:${address.port}`;
  return {
    endpoint,
    bucket,
    env: {
      UNKEY_ASSETMANAGERD_STORAGE_BACKEND: "s3",
      UNKEY_ASSETMANAGERD_S3_ENDPOINT: endpoint,
      UNKEY_ASSETMANAGERD_S3_BUCKET: bucket,
      UNKEY_ASSETMANAGERD_S3_ACCESS_KEY_ID: S3RVER_CREDENTIALS.accessKeyId,
      UNKEY_ASSETMANAGERD_S3_SECRET_ACCESS_KEY: S3RVER_CREDENTIALS.secretAccessKey,
      UNKEY_ASSETMANAGERD_S3_PART_SIZE: String(5 * 1024 * 1024),
    },
    async stop() {
      try {
        await server.close();
      } finally {
        dir.remove();
      }
    },
  };
}
