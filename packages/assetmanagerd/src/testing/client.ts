import type { MessageInitShape } from "@bufbuild/protobuf";
import { type Client, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { AssetManagerService, type assetmanagerd } from "@kiln/api";

export type AssetClient = Client<typeof AssetManagerService>;
type Metadata = MessageInitShape<typeof assetmanagerd.UploadAssetMetadataSchema>;

/** A client of a service listening at `baseUrl`, over HTTP/1.1 (JSON by default) or HTTP/2. */
export function assetClient(baseUrl: string, opts: { binary?: boolean; http2?: boolean } = {}): AssetClient {
  return createClient(
    AssetManagerService,
    createConnectTransport({ baseUrl, httpVersion: opts.http2 ? "2" : "1.1", useBinaryFormat: opts.binary }),
  );
}

/** Call options of an internal caller acting for `tenant`. */
export function asTenant(token: string, tenant: string, tier = "pro") {
  return {
    headers: { "x-kiln-service-token": token, "x-kiln-tenant-id": tenant, "x-kiln-tenant-tier": tier },
  };
}

/** The UploadAsset stream for `bytes`: metadata, then chunks. */
export async function* uploadStream(
  meta: Metadata,
  bytes: Uint8Array,
  chunkSize = 1024 * 1024,
): AsyncGenerator<MessageInitShape<typeof assetmanagerd.UploadAssetRequestSchema>> {
  yield { data: { case: "metadata", value: meta } };
  for (let o = 0; o < bytes.length; o += chunkSize) {
    yield { data: { case: "chunk", value: bytes.subarray(o, o + chunkSize) } };
  }
}

/** The ConnectError a call failed with (fails the test if it succeeded). */
export async function rpcError(call: Promise<unknown>): Promise<ConnectError> {
  try {
    await call;
  } catch (err) {
    return ConnectError.from(err);
  }
  throw new Error("expected the call to fail, but it succeeded");
}
