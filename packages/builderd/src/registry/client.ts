import { Readable } from "node:stream";
import { KilnError, type Logger } from "@kiln/kit";
import { ExponentialBackoff, handleWhen, retry } from "cockatiel";
import { isInsecureRegistry } from "../sources/policy.js";
import { type Credentials, createRegistryAuth } from "./auth.js";
import { RegistryNotFoundError, RegistryRequestError, RegistryUnavailableError } from "./errors.js";
import { createHttpClient, drain, type HttpResponse, RequestTimeoutError, readBody } from "./http.js";

/**
 * A client for one registry's OCI distribution API (pull side only): manifests and blobs of
 * repositories, with authentication, retries with exponential backoff on 5xx, 429, network errors
 * and timeouts (never on other 4xx), and the SSRF and TLS rules of ./http.ts.
 */

export interface RetrySettings {
  /** Retries after the first attempt (default 4). */
  retries?: number;
  initialDelayMs?: number;
  maxDelayMs?: number;
}

export interface RegistryClientOptions {
  /** host[:port] as the image reference names it ("docker.io" for Docker Hub). */
  registry: string;
  insecureRegistries: readonly string[];
  credentials?: Credentials;
  log: Logger;
  /** Idle timeout per request, connecting and streaming (default 60 s). */
  timeoutMs?: number;
  retry?: RetrySettings;
}

export interface ManifestResponse {
  body: Buffer;
  contentType?: string;
  /** Docker-Content-Digest, when the registry sent one. */
  digest?: string;
}

export interface RegistryClient {
  readonly registry: string;
  getManifest(
    repository: string,
    reference: string,
    accept: readonly string[],
    maxBytes: number,
    signal?: AbortSignal,
  ): Promise<ManifestResponse>;
  readBlob(repository: string, digest: string, maxBytes: number, signal?: AbortSignal): Promise<Buffer>;
  /** The blob's body as it streams (unverified: the caller verifies). */
  openBlob(repository: string, digest: string, signal?: AbortSignal): Promise<Readable>;
  close(): void;
}

/** Docker Hub's API lives on another host than its image names say. */
export function apiHostOf(registry: string): string {
  return registry === "docker.io" ? "registry-1.docker.io" : registry;
}

class RetryableStatusError extends Error {
  constructor(
    readonly status: number,
    readonly url: string,
  ) {
    super(`answered ${status} for ${url}`);
  }
}

const RETRYABLE_CODES = new Set([
  "ECONNRESET",
  "ECONNREFUSED",
  "ECONNABORTED",
  "ETIMEDOUT",
  "EPIPE",
  "EAI_AGAIN",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "ENETDOWN",
  "EPROTO",
]);

function isRetryable(err: Error): boolean {
  if (err instanceof KilnError) return false;
  if (err.name === "AbortError") return false;
  if (err instanceof RetryableStatusError || err instanceof RequestTimeoutError) return true;
  const code = (err as { code?: unknown }).code;
  return typeof code === "string" && RETRYABLE_CODES.has(code);
}

function effectiveHostPort(url: URL): string {
  return `${url.hostname}:${url.port || (url.protocol === "https:" ? "443" : "80")}`;
}

async function errorDetail(res: HttpResponse): Promise<string> {
  try {
    const body = await readBody(res.body, 64 * 1024, "error body");
    const doc = JSON.parse(body.toString("utf8")) as {
      errors?: Array<{ code?: unknown; message?: unknown }>;
    };
    const first = doc.errors?.[0];
    if (first) return `${String(first.code ?? "")}: ${String(first.message ?? "")}`.slice(0, 300);
  } catch {
    // Not a distribution error document; the status says enough.
  }
  return `HTTP ${res.status}`;
}

export function createRegistryClient(opts: RegistryClientOptions): RegistryClient {
  const { registry, log } = opts;
  const apiHost = apiHostOf(registry);
  const registryTrusted = isInsecureRegistry(opts.insecureRegistries, registry);
  const apiHostname = new URL(`http://${apiHost}`).hostname;
  // The operator's trust in a registry extends to its own host's other ports (a token service
  // beside it); anything else (object storage, a realm elsewhere) must be listed itself.
  const trusted = (url: URL) =>
    isInsecureRegistry(opts.insecureRegistries, url.host) ||
    isInsecureRegistry(opts.insecureRegistries, effectiveHostPort(url)) ||
    (registryTrusted && url.hostname === apiHostname);
  const base = new URL(`${registryTrusted ? "http" : "https"}://${apiHost}/v2/`);
  const http = createHttpClient({
    trusted,
    timeoutMs: opts.timeoutMs ?? 60_000,
    userAgent: "kiln-builderd/0.1",
  });
  const retries = opts.retry?.retries ?? 4;
  const policy = retry(handleWhen(isRetryable), {
    maxAttempts: retries,
    backoff: new ExponentialBackoff({
      initialDelay: opts.retry?.initialDelayMs ?? 250,
      maxDelay: opts.retry?.maxDelayMs ?? 10_000,
    }),
  });
  policy.onRetry((r) => {
    const reason = "error" in r ? r.error.message : "retryable result";
    log.warn(
      { registry, attempt: r.attempt, delay_ms: Math.round(r.delay), reason },
      "registry request failed; retrying",
    );
  });

  async function withRetries(
    what: string,
    fn: () => Promise<HttpResponse>,
    signal?: AbortSignal,
  ): Promise<HttpResponse> {
    try {
      return await policy.execute(async () => {
        signal?.throwIfAborted();
        const res = await fn();
        if (res.status >= 500 || res.status === 429) {
          drain(res);
          throw new RetryableStatusError(res.status, what);
        }
        return res;
      }, signal);
    } catch (err) {
      if (err instanceof RetryableStatusError) {
        throw new RegistryUnavailableError(
          registry,
          `registry ${registry} answered ${err.status} for ${what} after ${retries + 1} attempts; try again later`,
          { cause: err },
        );
      }
      if (err instanceof Error && isRetryable(err)) {
        throw new RegistryUnavailableError(
          registry,
          `cannot reach registry ${registry} (${err.message}) after ${retries + 1} attempts`,
          { cause: err },
        );
      }
      throw err;
    }
  }

  const auth = createRegistryAuth({
    registry,
    ...(opts.credentials ? { credentials: opts.credentials } : {}),
    get: (url, headers, signal) =>
      withRetries(`token ${url.host}${url.pathname}`, () => http.get(url, headers, signal), signal),
    onToken: (realm, scope) => log.debug({ registry, realm, scope }, "registry token obtained"),
  });

  /** GET with auth: a 401 is answered once with the challenge's credentials. */
  async function get(
    path: string,
    repository: string,
    headers: Record<string, string>,
    signal?: AbortSignal,
  ): Promise<HttpResponse> {
    const url = new URL(path, base);
    const scope = `repository:${repository}:pull`;
    const what = `${url.pathname}`;
    const send = (authorization: string | undefined) =>
      withRetries(
        what,
        () => http.get(url, authorization ? { ...headers, authorization } : headers, signal),
        signal,
      );
    let res = await send(auth.header(scope));
    if (res.status === 401) {
      const authorization = await auth.challenge(res, scope, signal);
      res = await send(authorization);
      if (res.status === 401) {
        drain(res);
        throw auth.refused(scope);
      }
    }
    return res;
  }

  async function expectOk(
    res: HttpResponse,
    repository: string,
    reference: string,
    what: string,
  ): Promise<void> {
    if (res.status === 200) return;
    const detail = await errorDetail(res);
    if (res.status === 404) throw new RegistryNotFoundError(registry, repository, reference, detail);
    if (res.status === 403) {
      throw new RegistryRequestError(
        registry,
        403,
        `registry ${registry} denied access to ${repository} (${detail})`,
      );
    }
    throw new RegistryRequestError(
      registry,
      res.status,
      `registry ${registry} answered ${res.status} for ${what} of ${repository}: ${detail}`,
    );
  }

  return {
    registry,
    async getManifest(repository, reference, accept, maxBytes, signal) {
      const res = await get(
        `${repository}/manifests/${reference}`,
        repository,
        { accept: accept.join(", ") },
        signal,
      );
      await expectOk(res, repository, reference, "manifest");
      const body = await readBody(res.body, maxBytes, `manifest ${reference} of ${registry}/${repository}`);
      const digest = res.headers["docker-content-digest"];
      const contentType = res.headers["content-type"];
      return {
        body,
        ...(contentType ? { contentType } : {}),
        ...(typeof digest === "string" ? { digest: digest.trim() } : {}),
      };
    },
    async readBlob(repository, digest, maxBytes, signal) {
      const res = await get(`${repository}/blobs/${digest}`, repository, {}, signal);
      await expectOk(res, repository, digest, "blob");
      return readBody(res.body, maxBytes, `blob ${digest} of ${registry}/${repository}`);
    },
    async openBlob(repository, digest, signal) {
      const path = `${repository}/blobs/${digest}`;
      const first = await get(path, repository, {}, signal);
      await expectOk(first, repository, digest, "blob");
      // A connection that breaks mid-blob resumes where it stopped (Range), with the same
      // backoff as other retries; registries that ignore Range resend from the start, and the
      // bytes already delivered are skipped.
      async function* resumable(): AsyncGenerator<Buffer> {
        let offset = 0;
        let body: Readable = first.body;
        let skip = 0;
        for (let resumes = 0; ; ) {
          try {
            for await (const chunk of body) {
              let c = chunk as Buffer;
              if (skip > 0) {
                const n = Math.min(skip, c.length);
                skip -= n;
                c = c.subarray(n);
                if (c.length === 0) continue;
              }
              offset += c.length;
              yield c;
            }
            return;
          } catch (err) {
            if (!(err instanceof Error) || !isRetryable(err) || signal?.aborted || resumes >= retries) {
              if (err instanceof Error && isRetryable(err)) {
                throw new RegistryUnavailableError(
                  registry,
                  `download of ${digest} from registry ${registry} broke off after ${offset} bytes (${err.message})${resumes > 0 ? ` and ${resumes} resumes` : ""}`,
                  { cause: err },
                );
              }
              throw err;
            }
            resumes++;
            const delay = Math.min(
              (opts.retry?.initialDelayMs ?? 250) * 2 ** (resumes - 1),
              opts.retry?.maxDelayMs ?? 10_000,
            );
            log.warn(
              { registry, digest, offset, attempt: resumes, reason: err.message },
              "blob download broke off; resuming",
            );
            await new Promise((r) => setTimeout(r, delay));
            const res = await get(path, repository, offset > 0 ? { range: `bytes=${offset}-` } : {}, signal);
            if (res.status === 206) {
              skip = 0;
            } else {
              await expectOk(res, repository, digest, "blob");
              skip = offset;
            }
            body = res.body;
          }
        }
      }
      return Readable.from(resumable(), { objectMode: false });
    },
    close: () => http.close(),
  };
}
