/**
 * Typed settings read from `UNKEY_<SERVICE>_<SETTING>` environment variables. A setting knows
 * its default, how to parse a raw string and how to describe its expected form, so a bad value
 * stops the start with an error that names the variable and the form, and the configuration
 * reference in docs/ is generated from the same definitions.
 */
export interface Setting<T> {
  readonly kind: string;
  /** Human description of the accepted form, used in errors and docs ("an integer 1-65535"). */
  readonly form: string;
  readonly doc: string;
  readonly default: T;
  /** Whether the value is a secret (shown as `***` when printing the effective config). */
  readonly secret?: boolean;
  parse(raw: string): T;
  format(value: T): string;
}

class ParseError extends Error {}

type Opts<T> = { default: T; doc: string; secret?: boolean };

function setting<T>(
  kind: string,
  form: string,
  opts: Opts<T>,
  parse: (raw: string) => T,
  format: (v: T) => string = String,
): Setting<T> {
  return { kind, form, doc: opts.doc, default: opts.default, secret: opts.secret, parse, format };
}

export function str(opts: Opts<string> & { pattern?: RegExp; form?: string }): Setting<string> {
  const form = opts.form ?? (opts.pattern ? `a string matching ${opts.pattern.source}` : "a string");
  return setting("string", form, opts, (raw) => {
    if (opts.pattern && !opts.pattern.test(raw)) throw new ParseError();
    return raw;
  });
}

export function int(opts: Opts<number> & { min?: number; max?: number }): Setting<number> {
  const min = opts.min ?? Number.MIN_SAFE_INTEGER;
  const max = opts.max ?? Number.MAX_SAFE_INTEGER;
  const form =
    opts.min !== undefined && opts.max !== undefined
      ? `an integer ${min}-${max}`
      : opts.min !== undefined
        ? `an integer >= ${min}`
        : "an integer";
  return setting("int", form, opts, (raw) => {
    if (!/^-?\d+$/.test(raw.trim())) throw new ParseError();
    const n = Number(raw.trim());
    if (!Number.isSafeInteger(n) || n < min || n > max) throw new ParseError();
    return n;
  });
}

export function port(opts: Opts<number>): Setting<number> {
  const base = int({ ...opts, min: 0, max: 65535 });
  return { ...base, kind: "port", form: "a TCP port 0-65535 (0 picks a free port)" };
}

export function bool(opts: Opts<boolean>): Setting<boolean> {
  return setting("bool", "true or false (also 1/0, yes/no)", opts, (raw) => {
    const v = raw.trim().toLowerCase();
    if (["true", "1", "yes", "on"].includes(v)) return true;
    if (["false", "0", "no", "off"].includes(v)) return false;
    throw new ParseError();
  });
}

export function oneOf<const V extends string>(values: readonly V[], opts: Opts<V>): Setting<V> {
  return setting("enum", `one of ${values.join(", ")}`, opts, (raw) => {
    const v = raw.trim() as V;
    if (!values.includes(v)) throw new ParseError();
    return v;
  });
}

/** Comma-separated list; empty items are dropped. */
export function list(opts: Opts<string[]> & { item?: RegExp; form?: string }): Setting<string[]> {
  const form = opts.form ?? "a comma-separated list";
  return setting(
    "list",
    form,
    opts,
    (raw) => {
      const items = raw
        .split(",")
        .map((s) => s.trim())
        .filter((s) => s.length > 0);
      if (opts.item && items.some((i) => !opts.item!.test(i))) throw new ParseError();
      return items;
    },
    (v) => v.join(","),
  );
}

const UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** A duration such as `500ms`, `30s`, `5m`, `1h`; parsed to milliseconds. */
export function duration(opts: Opts<number>): Setting<number> {
  return setting(
    "duration",
    "a duration such as 500ms, 30s, 5m or 1h",
    opts,
    (raw) => {
      const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)$/.exec(raw.trim());
      if (!m) throw new ParseError();
      return Math.round(Number(m[1]) * UNITS[m[2]!]!);
    },
    formatDuration,
  );
}

export function formatDuration(ms: number): string {
  if (ms % 3_600_000 === 0 && ms > 0) return `${ms / 3_600_000}h`;
  if (ms % 60_000 === 0 && ms > 0) return `${ms / 60_000}m`;
  if (ms % 1000 === 0) return `${ms / 1000}s`;
  return `${ms}ms`;
}

/** A URL with one of the given schemes; the empty string means "not set". */
export function url(opts: Opts<string> & { schemes: string[] }): Setting<string> {
  return setting(
    "url",
    `a URL (${opts.schemes.map((s) => `${s}://…`).join(" or ")}) or empty`,
    opts,
    (raw) => {
      const v = raw.trim();
      if (v === "") return "";
      let u: URL;
      try {
        u = new URL(v);
      } catch {
        throw new ParseError();
      }
      if (!opts.schemes.includes(u.protocol.replace(/:$/, ""))) throw new ParseError();
      return v;
    },
  );
}

export type ConfigSpec = Record<string, Setting<unknown>>;
export type ConfigOf<S extends ConfigSpec> = {
  -readonly [K in keyof S]: S[K] extends Setting<infer T> ? T : never;
};

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`invalid configuration:\n${problems.map((p) => `  - ${p}`).join("\n")}`);
    this.name = "ConfigError";
  }
}

/** `databaseUrl` → `DATABASE_URL`. */
export function settingSuffix(key: string): string {
  return key.replace(/([a-z0-9])([A-Z])/g, "$1_$2").toUpperCase();
}

export function envName(service: string, key: string): string {
  return `UNKEY_${service.toUpperCase()}_${settingSuffix(key)}`;
}

/**
 * Reads every setting of `spec` for `service` from `env`. All problems are collected and reported
 * together; unknown `UNKEY_<SERVICE>_*` variables are reported too (a typo should not be ignored).
 */
export function loadConfig<S extends ConfigSpec>(
  service: string,
  spec: S,
  env: Record<string, string | undefined> = process.env,
): ConfigOf<S> {
  const problems: string[] = [];
  const out: Record<string, unknown> = {};
  const known = new Set<string>();
  for (const [key, s] of Object.entries(spec)) {
    const name = envName(service, key);
    known.add(name);
    const raw = env[name];
    if (raw === undefined) {
      out[key] = s.default;
      continue;
    }
    try {
      out[key] = s.parse(raw);
    } catch (err) {
      if (!(err instanceof ParseError)) throw err;
      const shown = s.secret ? "***" : JSON.stringify(raw);
      problems.push(`${name}=${shown}: expected ${s.form}`);
    }
  }
  const prefix = `UNKEY_${service.toUpperCase()}_`;
  for (const name of Object.keys(env)) {
    if (name.startsWith(prefix) && !known.has(name)) {
      problems.push(`${name}: unknown setting for ${service} (see docs/configuration.md)`);
    }
  }
  if (problems.length > 0) throw new ConfigError(problems);
  return out as ConfigOf<S>;
}

/** The effective configuration as `NAME=value` pairs, secrets masked. */
export function describeConfig<S extends ConfigSpec>(
  service: string,
  spec: S,
  config: ConfigOf<S>,
): Array<{ name: string; value: string; default: boolean }> {
  return Object.entries(spec).map(([key, s]) => {
    const value = (config as Record<string, unknown>)[key];
    const shown = s.secret && value !== "" ? "***" : s.format(value as never);
    return { name: envName(service, key), value: shown, default: shown === s.format(s.default as never) };
  });
}
