import fs from "node:fs/promises";
import path from "node:path";
import { ImageNotFoundError, LocalPathNotAllowedError, RegistryNotAllowedError } from "./errors.js";

/**
 * Who may read what: the tenant tier's registry allow-list, the operator's trusted (insecure)
 * registries, and the directories local transports may read from.
 */

function splitHostPort(hostPort: string): { host: string; port?: string } {
  const m = /^(\[[^\]]+\]|[^:]+)(?::(\d+))?$/.exec(hostPort.toLowerCase());
  if (!m?.[1]) return { host: hostPort.toLowerCase() };
  return m[2] !== undefined ? { host: m[1], port: m[2] } : { host: m[1] };
}

/**
 * Whether `registry` (host[:port]) matches a list entry: the same host:port; an entry without a
 * port matches the host on any port; `*.example.com` matches subdomains; `*` matches anything.
 */
export function hostListMatches(list: readonly string[], registry: string): boolean {
  const r = splitHostPort(registry);
  return list.some((raw) => {
    const entry = raw.trim().toLowerCase();
    if (entry === "*") return true;
    const e = splitHostPort(entry);
    if (e.port !== undefined && e.port !== r.port) return false;
    if (e.host.startsWith("*.")) return r.host.endsWith(e.host.slice(1));
    return e.host === r.host;
  });
}

/** The operator's UNKEY_BUILDERD_INSECURE_REGISTRIES: exact host[:port] entries only. */
export function isInsecureRegistry(insecure: readonly string[], hostPort: string): boolean {
  const wanted = hostPort.toLowerCase();
  return insecure.some((e) => e.trim().toLowerCase() === wanted);
}

/** Throws RegistryNotAllowedError unless the tier allows the registry (trusted ones always are). */
export function checkRegistryAllowed(
  registry: string,
  allowed: readonly string[],
  insecure: readonly string[],
): void {
  if (isInsecureRegistry(insecure, registry)) return;
  if (hostListMatches(allowed, registry)) return;
  throw new RegistryNotAllowedError(registry, allowed);
}

/**
 * The real path of a local image source, which must lie inside one of `dirs` (also after
 * resolving symlinks, so a link cannot point a build at the host's files).
 */
export async function resolveLocalPath(given: string, dirs: readonly string[]): Promise<string> {
  if (dirs.length === 0) throw new LocalPathNotAllowedError(given, dirs);
  let real: string;
  try {
    real = await fs.realpath(given);
  } catch (err) {
    // Report an outside path as outside, not as missing, so probing reveals nothing.
    if (!(await insideAny(path.resolve(given), dirs))) throw new LocalPathNotAllowedError(given, dirs);
    if ((err as NodeJS.ErrnoException).code === "ENOENT")
      throw new ImageNotFoundError(given, "no such file or directory");
    throw err;
  }
  if (!(await insideAny(real, dirs))) throw new LocalPathNotAllowedError(given, dirs);
  return real;
}

async function insideAny(p: string, dirs: readonly string[]): Promise<boolean> {
  for (const dir of dirs) {
    const root = await fs.realpath(dir).catch(() => path.resolve(dir));
    if (isInside(root, p)) return true;
  }
  return false;
}

export function isInside(root: string, p: string): boolean {
  const rel = path.relative(root, p);
  return rel === "" || (rel !== ".." && !rel.startsWith(`..${path.sep}`) && !path.isAbsolute(rel));
}
