import { InvalidArgumentError } from "@kiln/kit";
import { describe, expect, it } from "vitest";
import type { VmSpec } from "../backend.js";
import {
  containerArgs,
  DEFAULT_CAPABILITIES,
  ociRuntimeConfig,
  renderHosts,
  renderResolvConf,
} from "./config.js";

const spec: VmSpec = {
  vmId: "vm_1",
  tenantId: "acme",
  vcpus: 2,
  memoryBytes: 256 << 20,
  dir: "/var/lib/kiln/vms/vm_1",
  rootfs: "/var/lib/kiln/assets/sha256/ab/abc",
  kernelArgs: [],
  workload: {
    entrypoint: ["/docker-entrypoint.sh"],
    cmd: ["nginx", "-g", "daemon off;"],
    env: { PATH: "/usr/bin:/bin", GREETING: 'it\'s a "VM"' },
    workingDir: "/srv",
    user: "www",
  },
  hostname: "web-1",
  network: {
    netnsPath: "/var/run/netns/kiln-abc",
    guestIp: "10.213.0.7",
    prefixLen: 24,
    gateway: "10.213.0.1",
    dns: "10.213.0.1, 1.1.1.1",
    macAddress: "02:6b:00:00:00:07",
  },
  ports: [],
  cgroupParent: "kiln/acme/vm_1",
  consoleLog: "/var/lib/kiln/vms/vm_1/console.log",
};

const input = {
  spec,
  user: { uid: 1000, gid: 1000, additionalGids: [27] },
  args: containerArgs(spec, true),
  network: { kind: "join" as const, path: "/var/run/netns/kiln-abc" },
  cgroupsPath: "/kiln/acme/vm_1/runc",
  etcFiles: [{ destination: "/etc/hosts", source: "/var/lib/kiln/vms/vm_1/runc/etc/hosts" }],
  limits: { memory: true, cpu: true },
  nofile: 20000,
};

describe("ociRuntimeConfig", () => {
  it("runs the image's command under Kiln's tini, as the image's user, in the VM's namespace and cgroup", () => {
    const c = ociRuntimeConfig(input);
    expect(c.process.args).toEqual([
      "/.kiln/tini",
      "-g",
      "--",
      "/docker-entrypoint.sh",
      "nginx",
      "-g",
      "daemon off;",
    ]);
    expect(c.process.user).toEqual({ uid: 1000, gid: 1000, additionalGids: [27] });
    expect(c.process.env).toEqual(["PATH=/usr/bin:/bin", "HOSTNAME=web-1", 'GREETING=it\'s a "VM"']);
    expect(c.process.cwd).toBe("/srv");
    expect(c.process.terminal).toBe(false);
    expect(c.process.noNewPrivileges).toBe(true);
    expect(c.process.rlimits).toEqual([{ type: "RLIMIT_NOFILE", hard: 20000, soft: 20000 }]);
    // An unprivileged user gets no capabilities at all.
    expect(c.process.capabilities.effective).toEqual([]);
    expect(c.process.capabilities.bounding).toEqual([]);
    expect(c.root).toEqual({ path: "rootfs", readonly: false });
    expect(c.hostname).toBe("web-1");
    expect(c.linux.namespaces).toEqual([
      { type: "pid" },
      { type: "ipc" },
      { type: "uts" },
      { type: "mount" },
      { type: "network", path: "/var/run/netns/kiln-abc" },
    ]);
    expect(c.linux.cgroupsPath).toBe("/kiln/acme/vm_1/runc");
    expect(c.linux.resources.memory).toEqual({ limit: 256 << 20 });
    expect(c.linux.resources.cpu).toEqual({ quota: 200_000, period: 100_000 });
    expect(c.mounts.at(-1)).toEqual({
      destination: "/etc/hosts",
      type: "bind",
      source: "/var/lib/kiln/vms/vm_1/runc/etc/hosts",
      options: ["rbind", "rprivate", "nosuid", "nodev", "noexec"],
    });
    expect(c.annotations).toEqual({ "dev.kiln.vm-id": "vm_1", "dev.kiln.tenant-id": "acme" });
  });

  it("gives root Docker's capabilities without NET_RAW and MKNOD", () => {
    const c = ociRuntimeConfig({ ...input, user: { uid: 0, gid: 0, additionalGids: [] } });
    expect(c.process.capabilities.effective).toEqual(DEFAULT_CAPABILITIES);
    expect(c.process.capabilities.effective).not.toContain("CAP_NET_RAW");
    expect(c.process.capabilities.ambient).toEqual([]);
    expect(c.process.user).toEqual({ uid: 0, gid: 0 });
  });

  it("leaves the network namespace out for gVisor, or makes a private one without a network", () => {
    const ns = (kind: "inherit" | "private") =>
      ociRuntimeConfig({ ...input, network: { kind } }).linux.namespaces.filter((n) => n.type === "network");
    expect(ns("inherit")).toEqual([]);
    expect(ns("private")).toEqual([{ type: "network" }]);
    const noLimits = ociRuntimeConfig({ ...input, limits: { memory: false, cpu: false } }).linux.resources;
    expect(noLimits).toEqual({ devices: [{ allow: false, access: "rwm" }] });
  });

  it("runs the bare command when the image has no Kiln tini", () => {
    expect(containerArgs({ ...spec, workload: { ...spec.workload, entrypoint: [] } }, false)).toEqual([
      "nginx",
      "-g",
      "daemon off;",
    ]);
  });

  it.each([
    [{ entrypoint: [], cmd: [] }, "workload.cmd"],
    [{ workingDir: "srv" }, "workload.workingDir"],
    [{ env: { "A=B": "x" } }, "workload.env.A=B"],
  ])("refuses %j naming %s", (over, field) => {
    const s = { ...spec, workload: { ...spec.workload, ...over } };
    let err: unknown;
    try {
      ociRuntimeConfig({ ...input, spec: s, args: ["x"] });
      containerArgs(s, true);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(InvalidArgumentError);
    expect((err as InvalidArgumentError).field).toBe(field);
  });
});

describe("/etc files", () => {
  it("names the VM on its address and lists the resolvers", () => {
    expect(renderHosts(spec)).toBe(
      "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n10.213.0.7\tweb-1\n",
    );
    expect(renderHosts({ ...spec, network: undefined })).toContain("127.0.0.1\tlocalhost web-1\n");
    expect(renderResolvConf(spec)).toBe("nameserver 10.213.0.1\nnameserver 1.1.1.1\n");
    expect(renderResolvConf({ ...spec, network: undefined })).toBeUndefined();
  });
});
