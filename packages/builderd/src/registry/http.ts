import http from "node:http";
import https from "node:https";
import { PermissionDeniedError } from "@kiln/kit";
import { checkLiteralAddress, createGuardedLookup } from "./address-guard.js";
import { RegistryRequestError, ResponseTooLargeError } from "./errors.js";

/**
 * One GET, the way a registry client must send it: https unless the target is trusted, the SSRF
 * guard on every connection, a per-request idle timeout, and redirects followed by hand (at most
 * five) so each target is checked again — registries send blob GETs to object storage, which must
 * not become a way to reach the host's network. Credentials never follow a redirect to another
 * origin.
 */

export interface HttpResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  /** Each header's values, unjoined (WWW-Authenticate may come more than once). */
  headersDistinct: NodeJS.Dict<string[]>;
  /** Where the answer came from, after redirects. */
  url: URL;
  body: http.IncomingMessage;
}

export interface HttpClientOptions {
  /** Targets the operator trusts: plain http and private addresses allowed. */
  trusted(url: URL): boolean;
  timeoutMs: number;
  maxRedirects?: number;
  userAgent?: string;
}

export interface HttpClient {
  get(url: URL, headers: Record<string, string>, signal?: AbortSignal): Promise<HttpResponse>;
  /** Closes idle keep-alive connections. */
  close(): void;
}

/** No bytes for timeoutMs while connecting or streaming. */
export class RequestTimeoutError extends Error {
  readonly code = "ETIMEDOUT";
}

export class InsecureTargetError extends PermissionDeniedError {
  constructor(readonly url: string) {
    super(
      `refusing plain http to ${url}: only registries listed in UNKEY_BUILDERD_INSECURE_REGISTRIES may be reached without TLS`,
    );
  }
}

const REDIRECTS = new Set([301, 302, 303, 307, 308]);

export function createHttpClient(opts: HttpClientOptions): HttpClient {
  const maxRedirects = opts.maxRedirects ?? 5;
  // Keep-alive pools per client (one per image source): sockets were validated under this
  // source's rules when they were opened.
  const agents = {
    "http:": new http.Agent({ keepAlive: true, timeout: opts.timeoutMs }),
    "https:": new https.Agent({ keepAlive: true, timeout: opts.timeoutMs }),
  };

  function once(
    url: URL,
    headers: Record<string, string>,
    signal?: AbortSignal,
  ): Promise<http.IncomingMessage> {
    const trusted = opts.trusted(url);
    if (url.protocol !== "https:" && !(url.protocol === "http:" && trusted)) {
      if (url.protocol === "http:") return Promise.reject(new InsecureTargetError(url.origin));
      return Promise.reject(
        new RegistryRequestError(
          url.host,
          0,
          `refusing ${url.protocol} URL ${url.origin}: only https is supported`,
        ),
      );
    }
    if (!trusted) {
      try {
        checkLiteralAddress(url);
      } catch (err) {
        return Promise.reject(err);
      }
    }
    const mod = url.protocol === "https:" ? https : http;
    return new Promise((resolve, reject) => {
      const req = mod.request(url, {
        method: "GET",
        headers: { "user-agent": opts.userAgent ?? "kiln-builderd", ...headers },
        agent: agents[url.protocol as "http:" | "https:"],
        ...(signal ? { signal } : {}),
        ...(trusted ? {} : { lookup: createGuardedLookup(url.host) }),
      });
      req.setTimeout(opts.timeoutMs, () =>
        req.destroy(new RequestTimeoutError(`no answer from ${url.host} for ${opts.timeoutMs} ms`)),
      );
      req.once("response", resolve);
      req.once("error", reject);
      req.end();
    });
  }

  return {
    async get(start, headers, signal) {
      let url = start;
      let sent = { ...headers };
      for (let hop = 0; ; hop++) {
        const res = await once(url, sent, signal);
        const location = res.headers.location;
        if (!REDIRECTS.has(res.statusCode ?? 0) || !location) {
          return {
            status: res.statusCode ?? 0,
            headers: res.headers,
            headersDistinct: res.headersDistinct,
            url,
            body: res,
          };
        }
        res.resume();
        if (hop >= maxRedirects) {
          throw new RegistryRequestError(
            start.host,
            res.statusCode ?? 0,
            `${start.host} redirected more than ${maxRedirects} times`,
          );
        }
        const next = new URL(location, url);
        if (next.origin !== url.origin) {
          const { authorization: _dropped, ...rest } = sent;
          sent = rest;
        }
        url = next;
      }
    },
    close() {
      agents["http:"].destroy();
      agents["https:"].destroy();
    },
  };
}

/** Reads a whole (small) body; more than `maxBytes` fails instead of filling memory. */
export async function readBody(res: http.IncomingMessage, maxBytes: number, what: string): Promise<Buffer> {
  const declared = Number(res.headers["content-length"]);
  if (Number.isFinite(declared) && declared > maxBytes) {
    res.destroy();
    throw new ResponseTooLargeError(what, maxBytes);
  }
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const chunk of res) {
    n += (chunk as Buffer).length;
    if (n > maxBytes) {
      res.destroy();
      throw new ResponseTooLargeError(what, maxBytes);
    }
    chunks.push(chunk as Buffer);
  }
  return Buffer.concat(chunks);
}

/** Discards a body so the connection can be reused. */
export function drain(res: HttpResponse): void {
  res.body.resume();
}
