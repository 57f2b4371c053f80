import { InvalidArgumentError } from "@kiln/kit";

export const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/** The workload's runtime configuration: the image config with the request's overrides applied. */
export interface RuntimeConfig {
  entrypoint: string[];
  cmd: string[];
  env: Record<string, string>;
  workingDir: string;
  user: string;
  exposedPorts: string[];
  labels: Record<string, string>;
}

/** The request's RuntimeConfig; empty fields keep the image's values. */
export interface RuntimeOverrides {
  entrypoint: string[];
  command: string[];
  workingDir: string;
  environment: Record<string, string>;
  exposedPorts: string[];
  user: string;
}

interface ImageConfigFields {
  Entrypoint?: string[] | null;
  Cmd?: string[] | null;
  Env?: string[] | null;
  WorkingDir?: string;
  User?: string;
  ExposedPorts?: Record<string, unknown> | null;
  Labels?: Record<string, string> | null;
}

/**
 * Applies overrides with Docker's rules: a new entrypoint drops the image's CMD unless a command
 * is given too; environment variables merge over the image's; exposed ports add to the image's.
 */
export function resolveRuntimeConfig(
  image: ImageConfigFields | undefined,
  o: RuntimeOverrides,
): RuntimeConfig {
  const env: Record<string, string> = {};
  for (const kv of image?.Env ?? []) {
    const eq = kv.indexOf("=");
    if (eq > 0) env[kv.slice(0, eq)] = kv.slice(eq + 1);
  }
  Object.assign(env, o.environment);
  // As Docker does: a workload without PATH gets the conventional one.
  env.PATH ??= DEFAULT_PATH;
  const entrypoint = o.entrypoint.length > 0 ? o.entrypoint : (image?.Entrypoint ?? []);
  const cmd = o.command.length > 0 ? o.command : o.entrypoint.length > 0 ? [] : (image?.Cmd ?? []);
  const ports = new Set([...Object.keys(image?.ExposedPorts ?? {}), ...o.exposedPorts.map(normalizePort)]);
  const workingDir = o.workingDir || image?.WorkingDir || "/";
  if (!workingDir.startsWith("/")) {
    throw new InvalidArgumentError(`working directory ${JSON.stringify(workingDir)} must be absolute`, {
      field: "config.target.microvm_rootfs.runtime_config.working_dir",
    });
  }
  return {
    entrypoint,
    cmd,
    env,
    workingDir,
    user: o.user || image?.User || "",
    exposedPorts: [...ports].sort(),
    labels: { ...(image?.Labels ?? {}) },
  };
}

/** "80" → "80/tcp"; refuses what is not PORT[/tcp|udp]. */
export function normalizePort(p: string): string {
  const m = /^(\d{1,5})(?:\/(tcp|udp))?$/.exec(p.trim());
  const port = m ? Number(m[1]) : 0;
  if (!m || port < 1 || port > 65535) {
    throw new InvalidArgumentError(`exposed port ${JSON.stringify(p)} is not PORT[/tcp|udp]`, {
      field: "config.target.microvm_rootfs.runtime_config.exposed_ports",
    });
  }
  return `${port}/${m[2] ?? "tcp"}`;
}
