import fsp from "node:fs/promises";
import http from "node:http";
import https from "node:https";
import { fromBinary, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { createMethodUrl } from "@connectrpc/connect/protocol";
import {
  endStreamFlag,
  endStreamFromJson,
  requestHeader,
  validateResponse,
} from "@connectrpc/connect/protocol-connect";
import { AssetManagerService, assetmanagerd as api } from "@kiln/api";
import { encodeRequest, MAX_CHUNK_BYTES, MAX_CHUNK_HEADER, writeChunkHeader } from "./upload-encoding.js";

/** Where assetmanagerd listens, and the headers every call carries (tenant, service token). */
export interface UploadEndpoint {
  /** e.g. `http://127.0.0.1:8083`. */
  readonly baseUrl: string;
  readonly headers?: Readonly<Record<string, string>>;
}

export interface UploadFileOptions {
  readonly signal?: AbortSignal;
  readonly timeoutMs?: number;
  /** Bytes per chunk message: default 256 KiB, at most 4 MiB. */
  readonly chunkBytes?: number;
}

export const DEFAULT_CHUNK_BYTES = 256 * 1024;
/** File bytes read (one preadv) and written (one socket write) at a time. */
const FRAME_DATA_BYTES = 4 * 1024 * 1024;
/** Frames in flight: one being read while up to two are written. */
const FRAMES = 3;
/** Bound on the response: one UploadAssetResponse and the end of the stream. */
const MAX_RESPONSE_BYTES = 4 * 1024 * 1024;

/**
 * UploadAsset of a file: the same Connect call (binary, HTTP/1.1) that
 * `client.uploadAsset(stream)` makes, framed by hand (upload-encoding.ts) so the file's bytes are
 * read straight into the buffers that go to the socket. Three buffers of 4 MiB are reused for the
 * whole file: no per-chunk allocation, serialization copy or garbage, and one preadv and one
 * socket write per 4 MiB. A generic Connect client spends several times the CPU on the same
 * upload (the `assets` bench prints both sides' CPU).
 *
 * `sizeBytes` defaults to the file's size, so a file that changes while it streams is refused by
 * the service (size mismatch) rather than stored half-old; a file that shrinks fails here.
 * The call's errors are ConnectErrors, as from a Connect client; the file's own (ENOENT, EACCES…)
 * are thrown as they are, before anything is sent. No interceptors run: pass what they would add
 * (the service token) in `endpoint.headers`.
 */
export async function uploadAssetFile(
  endpoint: UploadEndpoint,
  metadata: MessageInitShape<typeof api.UploadAssetMetadataSchema>,
  file: string,
  opts: UploadFileOptions = {},
): Promise<api.UploadAssetResponse> {
  const chunkBytes = opts.chunkBytes ?? DEFAULT_CHUNK_BYTES;
  if (!Number.isInteger(chunkBytes) || chunkBytes < 1 || chunkBytes > MAX_CHUNK_BYTES)
    throw new RangeError(`chunkBytes must be 1…${MAX_CHUNK_BYTES}, not ${chunkBytes}`);
  const handle = await fsp.open(file, "r");
  try {
    const size = (await handle.stat()).size;
    const url = createMethodUrl(endpoint.baseUrl, AssetManagerService.method.uploadAsset);
    const header = requestHeader("client_streaming", true, opts.timeoutMs, endpoint.headers, true);
    const signals = [opts.signal, opts.timeoutMs ? AbortSignal.timeout(opts.timeoutMs) : undefined];
    const signal = AbortSignal.any(signals.filter((s) => s !== undefined));
    const req = (url.startsWith("https:") ? https : http).request(url, {
      method: "POST",
      headers: Object.fromEntries(header),
      signal,
    });
    let answered = false;
    const res = await new Promise<http.IncomingMessage>((resolve, reject) => {
      req.on("error", reject);
      req.once("response", (r) => {
        answered = true;
        resolve(r);
      });
      const body = {
        metadata: encodeRequest({
          data: { case: "metadata", value: { sizeBytes: BigInt(size), ...metadata } },
        }),
        handle,
        file,
        size,
        chunkBytes,
        stopped: () => answered || req.destroyed,
      };
      sendBody(req, body).catch((err: unknown) => {
        reject(err);
        req.destroy();
      });
    }).catch((err: unknown) => {
      throw nodeError(err, signal);
    });
    try {
      return await readResponse(res).catch((err: unknown) => {
        throw nodeError(err, signal);
      });
    } finally {
      // An early answer (an error) leaves the rest of the body unsent: drop the connection.
      if (!req.writableFinished) req.destroy();
    }
  } finally {
    await handle.close();
  }
}

/** Writes the metadata message, then the file as chunk messages, frame by frame. */
async function sendBody(
  req: http.ClientRequest,
  b: {
    metadata: Uint8Array;
    handle: fsp.FileHandle;
    file: string;
    size: number;
    chunkBytes: number;
    stopped: () => boolean;
  },
): Promise<void> {
  req.write(b.metadata);
  const perFrame = Math.max(1, Math.floor(FRAME_DATA_BYTES / b.chunkBytes));
  const frameBytes = perFrame * (MAX_CHUNK_HEADER + b.chunkBytes);
  const free: Buffer[] = [];
  let allocated = 0;
  let wake: (() => void) | undefined;
  // A frame is reused once the socket has taken it (its write callback).
  const release = (buf: Buffer) => {
    free.push(buf);
    wake?.();
    wake = undefined;
  };
  for (let pos = 0; pos < b.size; ) {
    let buf = free.pop();
    if (!buf && allocated < FRAMES) {
      buf = Buffer.allocUnsafeSlow(frameBytes);
      allocated++;
    }
    while (!buf) {
      await new Promise<void>((resolve) => {
        wake = resolve;
      });
      if (b.stopped()) return;
      buf = free.pop();
    }
    if (b.stopped()) return;
    const slots: Buffer[] = [];
    let used = 0;
    let taken = 0;
    for (let i = 0; i < perFrame && pos + taken < b.size; i++) {
      const len = Math.min(b.chunkBytes, b.size - pos - taken);
      used += writeChunkHeader(buf, used, len);
      slots.push(buf.subarray(used, used + len));
      used += len;
      taken += len;
    }
    await readFully(b.handle, slots, pos, b.file, b.size);
    if (b.stopped()) return;
    pos += taken;
    const frame = buf;
    req.write(frame.subarray(0, used), () => release(frame));
  }
  req.end();
}

/** Fills `slots` from the file at `position` (preadv; loops on short reads). */
async function readFully(
  handle: fsp.FileHandle,
  slots: Buffer[],
  position: number,
  file: string,
  size: number,
): Promise<void> {
  let pending = slots;
  while (pending.length > 0) {
    const { bytesRead } = await handle.readv(pending, position);
    if (bytesRead === 0)
      throw new ConnectError(
        `${file} shrank while it was uploaded (${size} bytes at the start, ${position} now)`,
        Code.FailedPrecondition,
      );
    position += bytesRead;
    let skip = bytesRead;
    while (pending.length > 0 && skip >= pending[0]!.length) skip -= pending.shift()!.length;
    if (skip > 0) pending = [pending[0]!.subarray(skip), ...pending.slice(1)];
  }
}

/** The Connect streaming response: the UploadAssetResponse, then the end of the stream. */
async function readResponse(res: http.IncomingMessage): Promise<api.UploadAssetResponse> {
  const headers = new Headers();
  for (const [k, v] of Object.entries(res.headers)) {
    if (v === undefined) continue;
    for (const value of Array.isArray(v) ? v : [v]) headers.append(k, value);
  }
  // A status other than 200 or a content type that is not Connect's streaming proto: throws.
  validateResponse("client_streaming", true, res.statusCode ?? 0, headers);
  const parts: Buffer[] = [];
  let length = 0;
  for await (const part of res) {
    length += (part as Buffer).length;
    if (length > MAX_RESPONSE_BYTES)
      throw new ConnectError(`response larger than ${MAX_RESPONSE_BYTES} bytes`, Code.ResourceExhausted);
    parts.push(part as Buffer);
  }
  const body = Buffer.concat(parts);
  let message: api.UploadAssetResponse | undefined;
  let ended = false;
  for (let o = 0; o < body.length; ) {
    if (ended) throw new ConnectError("protocol error: data after EndStreamResponse", Code.InvalidArgument);
    if (body.length - o < 5)
      throw new ConnectError("protocol error: incomplete envelope", Code.InvalidArgument);
    const flags = body[o]!;
    const len = body.readUInt32BE(o + 1);
    const data = body.subarray(o + 5, o + 5 + len);
    if (data.length < len)
      throw new ConnectError("protocol error: incomplete envelope", Code.InvalidArgument);
    o += 5 + len;
    if (flags === endStreamFlag) {
      const end = endStreamFromJson(data);
      if (end.error) {
        for (const [key, value] of headers) end.error.metadata.append(key, value);
        throw end.error;
      }
      ended = true;
    } else if (flags === 0 && !message) {
      message = fromBinary(api.UploadAssetResponseSchema, data);
    } else {
      throw new ConnectError(`protocol error: unexpected envelope (flags ${flags})`, Code.InvalidArgument);
    }
  }
  if (!ended) throw new ConnectError("protocol error: missing EndStreamResponse", Code.InvalidArgument);
  if (!message) throw new ConnectError("protocol error: missing UploadAssetResponse", Code.Unimplemented);
  return message;
}

/** A failure of the HTTP exchange as the code a Connect client would give it. */
function nodeError(err: unknown, signal: AbortSignal): ConnectError {
  if (err instanceof ConnectError) return err;
  if (signal.aborted) {
    const reason: unknown = signal.reason;
    const timedOut = reason instanceof DOMException && reason.name === "TimeoutError";
    return new ConnectError(
      timedOut ? "the upload timed out" : "the upload was canceled",
      timedOut ? Code.DeadlineExceeded : Code.Canceled,
      undefined,
      undefined,
      err,
    );
  }
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  const unavailable = ["ECONNREFUSED", "ECONNRESET", "EPIPE", "ENOTFOUND", "EAI_AGAIN", "ETIMEDOUT"];
  return ConnectError.from(err, code && unavailable.includes(code) ? Code.Unavailable : Code.Internal);
}
