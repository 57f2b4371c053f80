import { describe, expect, it } from "vitest";
import { DEFAULT_PATH, normalizePort, resolveRuntimeConfig } from "./runtime-config.js";

const none = { entrypoint: [], command: [], workingDir: "", environment: {}, exposedPorts: [], user: "" };
const image = {
  Entrypoint: ["/docker-entrypoint.sh"],
  Cmd: ["nginx", "-g", "daemon off;"],
  Env: ["PATH=/usr/bin:/bin", "A=1=2", "MALFORMED"],
  WorkingDir: "/srv",
  User: "nginx",
  ExposedPorts: { "80/tcp": {} },
  Labels: { maintainer: "x" },
};

describe("resolveRuntimeConfig", () => {
  it("keeps the image's config when nothing is overridden", () => {
    expect(resolveRuntimeConfig(image, none)).toEqual({
      entrypoint: ["/docker-entrypoint.sh"],
      cmd: ["nginx", "-g", "daemon off;"],
      env: { PATH: "/usr/bin:/bin", A: "1=2" },
      workingDir: "/srv",
      user: "nginx",
      exposedPorts: ["80/tcp"],
      labels: { maintainer: "x" },
    });
  });

  it("drops the image's CMD when only the entrypoint is overridden (Docker's rule)", () => {
    const r = resolveRuntimeConfig(image, { ...none, entrypoint: ["/bin/sh", "-c"] });
    expect(r.entrypoint).toEqual(["/bin/sh", "-c"]);
    expect(r.cmd).toEqual([]);
  });

  it("replaces CMD but keeps the entrypoint when only the command is overridden", () => {
    const r = resolveRuntimeConfig(image, { ...none, command: ["nginx", "-T"] });
    expect(r.entrypoint).toEqual(["/docker-entrypoint.sh"]);
    expect(r.cmd).toEqual(["nginx", "-T"]);
  });

  it("merges env over the image's, adds ports, overrides user and workdir", () => {
    const r = resolveRuntimeConfig(image, {
      ...none,
      environment: { A: "override", B: "new" },
      exposedPorts: ["8080", "53/udp"],
      user: "1000:1000",
      workingDir: "/app",
    });
    expect(r.env).toEqual({ PATH: "/usr/bin:/bin", A: "override", B: "new" });
    expect(r.exposedPorts).toEqual(["53/udp", "80/tcp", "8080/tcp"]);
    expect(r.user).toBe("1000:1000");
    expect(r.workingDir).toBe("/app");
  });

  it("defaults to /, root and Docker's PATH for images without a config", () => {
    expect(resolveRuntimeConfig(undefined, none)).toMatchObject({
      workingDir: "/",
      user: "",
      entrypoint: [],
      cmd: [],
      env: { PATH: DEFAULT_PATH },
    });
  });

  it("refuses a relative working directory", () => {
    expect(() => resolveRuntimeConfig(image, { ...none, workingDir: "app" })).toThrow(/must be absolute/);
  });
});

describe("normalizePort", () => {
  it.each([
    ["80", "80/tcp"],
    ["53/udp", "53/udp"],
    [" 443/tcp ", "443/tcp"],
  ])("%s → %s", (input, out) => expect(normalizePort(input)).toBe(out));
  it.each(["0", "70000", "http", "80/sctp", ""])("refuses %j", (p) =>
    expect(() => normalizePort(p)).toThrow(/is not PORT/),
  );
});
