import { RegistryAuthError } from "./errors.js";
import { drain, type HttpResponse, readBody } from "./http.js";

/**
 * Registry authentication (Docker's token spec and plain Basic): the registry answers 401 with a
 * WWW-Authenticate challenge; for Basic we send the credentials, for Bearer we ask the realm for
 * a token (with the credentials, when there are any) for the challenge's service and scope, and
 * cache it per scope for this source. A token given with the request is sent as the bearer as is.
 * Secrets never appear in messages or logs.
 */

export interface Credentials {
  username?: string;
  password?: string;
  token?: string;
}

export interface Challenge {
  scheme: string;
  params: Record<string, string>;
}

const TOKEN_CHAR = /[A-Za-z0-9!#$%&'*+.^_`|~/-]/;

/** Parses WWW-Authenticate values (RFC 9110 §11.6.1): several challenges, quoted params. */
export function parseChallenges(values: readonly string[]): Challenge[] {
  const out: Challenge[] = [];
  for (const header of values) {
    let i = 0;
    let current: Challenge | undefined;
    const skip = (chars: string) => {
      while (i < header.length && chars.includes(header[i] as string)) i++;
    };
    const token = () => {
      const start = i;
      while (i < header.length && TOKEN_CHAR.test(header[i] as string)) i++;
      return header.slice(start, i);
    };
    while (i < header.length) {
      skip(" \t,");
      const name = token();
      if (name === "") {
        i++;
        continue;
      }
      skip(" \t");
      if (header[i] === "=" && current) {
        i++;
        skip(" \t");
        let value = "";
        if (header[i] === '"') {
          i++;
          while (i < header.length && header[i] !== '"') {
            if (header[i] === "\\") i++;
            value += header[i] ?? "";
            i++;
          }
          i++;
        } else {
          const start = i;
          while (i < header.length && header[i] !== "," && header[i] !== " ") i++;
          value = header.slice(start, i);
        }
        current.params[name.toLowerCase()] = value;
      } else {
        current = { scheme: name.toLowerCase(), params: {} };
        out.push(current);
      }
    }
  }
  return out;
}

export interface RegistryAuthOptions {
  registry: string;
  credentials?: Credentials;
  /** GETs a token realm URL (with the client's retries, guard and timeouts). */
  get(url: URL, headers: Record<string, string>, signal?: AbortSignal): Promise<HttpResponse>;
  /** Called once per token fetched (for logs; gets no secret). */
  onToken?(realm: string, scope: string): void;
}

export interface RegistryAuth {
  /** The Authorization header to send for `scope`, if one is known yet. */
  header(scope: string): string | undefined;
  /** Answers a 401: returns the header to retry with, or throws RegistryAuthError. */
  challenge(res: HttpResponse, scope: string, signal?: AbortSignal): Promise<string>;
  /** The error for a 401 that came back although we sent `header`. */
  refused(scope: string): RegistryAuthError;
}

const MAX_TOKEN_RESPONSE = 1024 * 1024;

export function createRegistryAuth(opts: RegistryAuthOptions): RegistryAuth {
  const { registry } = opts;
  const creds = opts.credentials ?? {};
  const hasBasic = Boolean(creds.username);
  const basic = hasBasic
    ? `Basic ${Buffer.from(`${creds.username}:${creds.password ?? ""}`).toString("base64")}`
    : undefined;
  const tokens = new Map<string, { value: string; expiresAt: number }>();
  let useBasic = false;

  const refused = (scope: string) =>
    new RegistryAuthError(
      registry,
      creds.token || hasBasic
        ? `registry ${registry} refused the credentials (for ${scope}); check the username/password or token given with the build`
        : `registry ${registry} requires authentication for ${scope} (or the repository does not exist); pass registry credentials with the build`,
    );

  async function fetchToken(challenge: Challenge, scope: string, signal?: AbortSignal): Promise<string> {
    const realm = challenge.params.realm;
    if (!realm) {
      throw new RegistryAuthError(
        registry,
        `registry ${registry} sent a Bearer challenge without a realm; cannot get a token`,
      );
    }
    let url: URL;
    try {
      url = new URL(realm);
    } catch (err) {
      throw new RegistryAuthError(registry, `registry ${registry} sent an invalid token realm`, {
        cause: err,
      });
    }
    if (challenge.params.service) url.searchParams.set("service", challenge.params.service);
    const wanted = challenge.params.scope ?? scope;
    for (const s of wanted.split(" ")) if (s) url.searchParams.append("scope", s);
    if (hasBasic && creds.username) url.searchParams.set("account", creds.username);
    const res = await opts.get(url, basic ? { authorization: basic } : {}, signal);
    if (res.status === 401 || res.status === 403) {
      drain(res);
      throw refused(scope);
    }
    if (res.status !== 200) {
      drain(res);
      throw new RegistryAuthError(
        registry,
        `token service ${url.host} of registry ${registry} answered ${res.status}`,
      );
    }
    const body = await readBody(res.body, MAX_TOKEN_RESPONSE, `token response from ${url.host}`);
    let doc: { token?: unknown; access_token?: unknown; expires_in?: unknown };
    try {
      doc = JSON.parse(body.toString("utf8")) as typeof doc;
    } catch (err) {
      throw new RegistryAuthError(
        registry,
        `token service ${url.host} of registry ${registry} sent invalid JSON`,
        { cause: err },
      );
    }
    const value = typeof doc.token === "string" && doc.token ? doc.token : doc.access_token;
    if (typeof value !== "string" || value === "") {
      throw new RegistryAuthError(
        registry,
        `token service ${url.host} of registry ${registry} sent no token`,
      );
    }
    // The spec's default lifetime is 60 s; renew a little early.
    const seconds = typeof doc.expires_in === "number" && doc.expires_in > 0 ? doc.expires_in : 60;
    tokens.set(scope, { value, expiresAt: Date.now() + Math.max(seconds - 10, 5) * 1000 });
    opts.onToken?.(url.host, wanted);
    return `Bearer ${value}`;
  }

  return {
    header(scope) {
      if (creds.token) return `Bearer ${creds.token}`;
      if (useBasic) return basic;
      const t = tokens.get(scope);
      return t && t.expiresAt > Date.now() ? `Bearer ${t.value}` : undefined;
    },
    async challenge(res, scope, signal) {
      drain(res);
      if (creds.token) throw refused(scope);
      const challenges = parseChallenges(res.headersDistinct["www-authenticate"] ?? []);
      const bearer = challenges.find((c) => c.scheme === "bearer");
      if (bearer) {
        tokens.delete(scope);
        return fetchToken(bearer, scope, signal);
      }
      if (challenges.some((c) => c.scheme === "basic")) {
        if (!basic || useBasic) throw refused(scope);
        useBasic = true;
        return basic;
      }
      throw new RegistryAuthError(
        registry,
        `registry ${registry} answered 401 without a supported challenge (${challenges.map((c) => c.scheme).join(", ") || "none"}); only Basic and Bearer are supported`,
      );
    },
    refused,
  };
}
