import { describe, expect, it } from "vitest";
import { commonSettings } from "./common.js";
import {
  bool,
  ConfigError,
  describeConfig,
  duration,
  envName,
  int,
  list,
  loadConfig,
  oneOf,
  port,
  str,
  url,
} from "./settings.js";

const spec = {
  port: port({ default: 8082, doc: "" }),
  workers: int({ default: 4, min: 1, max: 64, doc: "" }),
  enabled: bool({ default: false, doc: "" }),
  mode: oneOf(["fast", "safe"], { default: "safe", doc: "" }),
  registries: list({ default: [], item: /^[a-z0-9.-]+(:\d+)?$/, form: "host[:port] list", doc: "" }),
  timeout: duration({ default: 30_000, doc: "" }),
  databaseUrl: url({ default: "", schemes: ["postgres"], doc: "" }),
  serviceToken: str({
    default: "",
    secret: true,
    pattern: /^.{32,}$/,
    form: "at least 32 characters",
    doc: "",
  }),
};

describe("loadConfig", () => {
  it("uses defaults when nothing is set", () => {
    expect(loadConfig("builderd", spec, {})).toEqual({
      port: 8082,
      workers: 4,
      enabled: false,
      mode: "safe",
      registries: [],
      timeout: 30_000,
      databaseUrl: "",
      serviceToken: "",
    });
  });

  it("parses good values from UNKEY_<SERVICE>_<SETTING>", () => {
    const c = loadConfig("builderd", spec, {
      UNKEY_BUILDERD_PORT: "9000",
      UNKEY_BUILDERD_WORKERS: "8",
      UNKEY_BUILDERD_ENABLED: "yes",
      UNKEY_BUILDERD_MODE: "fast",
      UNKEY_BUILDERD_REGISTRIES: "127.0.0.1:5000, registry.local ,",
      UNKEY_BUILDERD_TIMEOUT: "1.5m",
      UNKEY_BUILDERD_DATABASE_URL: "postgres://u:p@db:5432/kiln",
      UNKEY_BUILDERD_SERVICE_TOKEN: "x".repeat(40),
      UNRELATED: "ignored",
    });
    expect(c).toMatchObject({
      port: 9000,
      workers: 8,
      enabled: true,
      mode: "fast",
      registries: ["127.0.0.1:5000", "registry.local"],
      timeout: 90_000,
      databaseUrl: "postgres://u:p@db:5432/kiln",
    });
  });

  it("reports every bad value at once, naming the variable and the expected form", () => {
    let error: unknown;
    try {
      loadConfig("builderd", spec, {
        UNKEY_BUILDERD_PORT: "80a",
        UNKEY_BUILDERD_WORKERS: "0",
        UNKEY_BUILDERD_ENABLED: "maybe",
        UNKEY_BUILDERD_MODE: "turbo",
        UNKEY_BUILDERD_REGISTRIES: "ok.example, bad host",
        UNKEY_BUILDERD_TIMEOUT: "10",
        UNKEY_BUILDERD_DATABASE_URL: "mysql://x",
        UNKEY_BUILDERD_SERVICE_TOKEN: "short-secret",
      });
    } catch (err) {
      error = err;
    }
    expect(error).toBeInstanceOf(ConfigError);
    const problems = (error as ConfigError).problems;
    expect(problems).toEqual([
      'UNKEY_BUILDERD_PORT="80a": expected a TCP port 0-65535 (0 picks a free port)',
      'UNKEY_BUILDERD_WORKERS="0": expected an integer 1-64',
      'UNKEY_BUILDERD_ENABLED="maybe": expected true or false (also 1/0, yes/no)',
      'UNKEY_BUILDERD_MODE="turbo": expected one of fast, safe',
      'UNKEY_BUILDERD_REGISTRIES="ok.example, bad host": expected host[:port] list',
      'UNKEY_BUILDERD_TIMEOUT="10": expected a duration such as 500ms, 30s, 5m or 1h',
      'UNKEY_BUILDERD_DATABASE_URL="mysql://x": expected a URL (postgres://…) or empty',
      // the secret's value is not echoed
      "UNKEY_BUILDERD_SERVICE_TOKEN=***: expected at least 32 characters",
    ]);
    expect((error as Error).message).toContain("invalid configuration");
  });

  it("rejects a port out of range and a non-integer", () => {
    expect(() => loadConfig("metald", spec, { UNKEY_METALD_PORT: "70000" })).toThrow(
      /UNKEY_METALD_PORT="70000"/,
    );
    expect(() => loadConfig("metald", spec, { UNKEY_METALD_WORKERS: "2.5" })).toThrow(/UNKEY_METALD_WORKERS/);
  });

  it("refuses unknown variables with the service's prefix (typos are not silently ignored)", () => {
    expect(() => loadConfig("builderd", spec, { UNKEY_BUILDERD_PROT: "1" })).toThrow(
      /UNKEY_BUILDERD_PROT: unknown setting for builderd/,
    );
  });

  it("masks secrets when describing the effective config", () => {
    const config = loadConfig("builderd", spec, { UNKEY_BUILDERD_SERVICE_TOKEN: "s".repeat(32) });
    const rows = describeConfig("builderd", spec, config);
    expect(rows.find((r) => r.name === "UNKEY_BUILDERD_SERVICE_TOKEN")).toEqual({
      name: "UNKEY_BUILDERD_SERVICE_TOKEN",
      value: "***",
      default: false,
    });
    expect(rows.find((r) => r.name === "UNKEY_BUILDERD_TIMEOUT")).toMatchObject({
      value: "30s",
      default: true,
    });
  });

  it("names variables from camelCase keys", () => {
    expect(envName("assetmanagerd", "metricsPort")).toBe("UNKEY_ASSETMANAGERD_METRICS_PORT");
    expect(envName("builderd", "otelEnabled")).toBe("UNKEY_BUILDERD_OTEL_ENABLED");
  });

  it("gives every service the common settings with its seed ports", () => {
    const c = loadConfig("builderd", commonSettings({ port: 8082, metricsPort: 9082 }), {});
    expect(c).toMatchObject({
      host: "127.0.0.1",
      port: 8082,
      metricsPort: 9082,
      logLevel: "info",
      otelEnabled: false,
    });
    expect(() =>
      loadConfig("builderd", commonSettings({ port: 8082, metricsPort: 9082 }), {
        UNKEY_BUILDERD_LOG_LEVEL: "loud",
      }),
    ).toThrow(
      /UNKEY_BUILDERD_LOG_LEVEL="loud": expected one of trace, debug, info, warn, error, fatal, silent/,
    );
  });
});
