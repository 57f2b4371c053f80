/**
 * Acceptance for issue #3 item 5: builderd builds a busybox-httpd *image* pulled from a real
 * registry into an ext4 rootfs (pull → extract → init → optimize → mkfs), and that rootfs boots
 * under QEMU microvm with the host kernel and Kiln's initramfs; its HTTP server answers from the
 * host through a forwarded port.
 *
 * The workload runs as the image's `www` user on port 8080, and a CGI script reports its uid and
 * hostname so the user switch and the kernel command line are checked inside the real VM.
 */
import { type ChildProcess, spawn } from "node:child_process";
import net from "node:net";
import path from "node:path";
import { createClient } from "@connectrpc/connect";
import { builderd as api, BuilderService } from "@kiln/api";
import { assetmanagerd } from "@kiln/assetmanagerd";
import { startTestService, type TestService, tempDir } from "@kiln/kit/testing";
import { afterAll, beforeAll, describe, expect, it, onTestFailed } from "vitest";
import { findHostKernel } from "../../../assetmanagerd/src/kernel/host-kernel.js";
import { buildInitramfs } from "../../../assetmanagerd/src/kernel/initramfs.js";
import { hostTscKhz, kvmUsable, QEMU_BINARY, qemuArgs } from "../../../metald/src/backends/qemu/cmdline.js";
import { builderd } from "../../src/definition.js";
import { HTTPD_INDEX as INDEX, pushBusyboxHttpd } from "../../src/testing/images.js";
import { startTestRegistry } from "../../src/testing/registry.js";

const HOSTNAME = "kiln-e2e";
const BOOT_TIMEOUT_MS = 60_000;

let work: { path: string; remove(): void };
let kernel: string;
let initrd: string;
let image: string;
let registry: Awaited<ReturnType<typeof startTestRegistry>> | undefined;
let svc: TestService | undefined;
let assets: TestService | undefined;

beforeAll(async () => {
  work = tempDir("kiln-boot-e2e-");
  const host = await findHostKernel();
  kernel = host.vmlinuz;
  initrd = path.join(work.path, "initrd.img");
  await buildInitramfs({ modulesDir: host.modulesDir, out: initrd });

  registry = await startTestRegistry();
  const imageUri = await pushBusyboxHttpd(work.path, registry.host);
  // As under `kiln up`: builderd registers the rootfs with assetmanagerd, which owns the file.
  const builderData = path.join(work.path, "builderd-data");
  assets = await startTestService(assetmanagerd, {
    env: { UNKEY_ASSETMANAGERD_IMPORT_DIRS: path.join(builderData, "tenants") },
  });
  svc = await startTestService(builderd, {
    env: { UNKEY_BUILDERD_DATA_DIR: builderData, UNKEY_BUILDERD_INSECURE_REGISTRIES: registry.host },
    peerTransport: () => assets!.service.transport,
  });
  const client = createClient(BuilderService, svc.service.transport);
  const headers = { "x-kiln-tenant-id": "e2e", "x-kiln-tenant-tier": "pro" };
  const { buildId } = await client.createBuild(
    {
      config: {
        source: {
          sourceType: {
            case: "dockerImage",
            value: { imageUri },
          },
        },
        target: {
          targetType: {
            case: "microvmRootfs",
            value: { optimization: { removeDocs: true, removeCache: true } },
          },
        },
      },
    },
    { headers },
  );
  for await (const _ of client.streamBuildLogs({ buildId, follow: true }, { headers })) {
  }
  const { build } = await client.getBuild({ buildId }, { headers });
  expect(build?.errorMessage).toBe("");
  expect(build?.state).toBe(api.BuildState.COMPLETED);
  image = build!.rootfsPath;
}, 180_000);

afterAll(async () => {
  await svc?.stop();
  await assets?.stop();
  await registry?.stop();
  work?.remove();
});

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

/**
 * Sends QMP commands in order over the VM's control socket, each after the previous reply.
 * After "quit" QEMU may drop the connection before replying; that counts as done.
 */
async function qmp(socket: string, commands: string[]): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const conn = net.createConnection(socket);
    const queue = [...commands];
    let sent = "";
    let buf = "";
    conn.setTimeout(5_000, () => conn.destroy(new Error("QMP timed out")));
    conn.on("data", (d) => {
      buf += d.toString();
      let nl = buf.indexOf("\n");
      while (nl >= 0) {
        const msg = JSON.parse(buf.slice(0, nl)) as Record<string, unknown>;
        buf = buf.slice(nl + 1);
        nl = buf.indexOf("\n");
        if ("error" in msg) return conn.destroy(new Error(`QMP error: ${JSON.stringify(msg.error)}`));
        if ("QMP" in msg || "return" in msg) {
          const next = queue.shift();
          if (next === undefined) return conn.end();
          sent = next;
          conn.write(`{"execute":"${next}"}\n`);
        }
      }
    });
    conn.on("error", (err: NodeJS.ErrnoException) => {
      if (sent === "quit" && err.code === "ECONNRESET") resolve();
      else reject(err);
    });
    conn.on("close", () => resolve());
  });
}

function exited(child: ChildProcess, timeoutMs: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true);
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve(false), timeoutMs);
    child.once("exit", () => {
      clearTimeout(t);
      resolve(true);
    });
  });
}

async function get(url: string): Promise<{ status: number; body: string } | undefined> {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(1_000) });
    return { status: res.status, body: await res.text() };
  } catch {
    return undefined;
  }
}

describe("a busybox-httpd rootfs", () => {
  it("boots under QEMU microvm and answers HTTP from the host", async () => {
    const kvm = await kvmUsable();
    const port = await freePort();
    const qmpSocket = path.join(work.path, "qmp.sock");
    const args = qemuArgs({
      kernel,
      initrd,
      rootfs: image,
      memoryMiB: 256,
      vcpus: 1,
      kvm,
      tscKhz: await hostTscKhz(),
      qmpSocket,
      serial: "stdio",
      hostfwd: [{ hostAddr: "127.0.0.1", hostPort: port, guestPort: 8080, protocol: "tcp" }],
      hostname: HOSTNAME,
    });
    let serial = "";
    const started = performance.now();
    const vm = spawn(QEMU_BINARY, args, { stdio: ["ignore", "pipe", "pipe"] });
    vm.stdout!.on("data", (d: Buffer) => {
      serial += d.toString();
    });
    vm.stderr!.on("data", (d: Buffer) => {
      serial += `[qemu stderr] ${d.toString()}`;
    });
    onTestFailed(() => {
      console.error(`qemu ${args.join(" ")}\n--- serial console (pid ${vm.pid}) ---\n${serial}\n--- end ---`);
    });
    try {
      let page: { status: number; body: string } | undefined;
      while (!page && performance.now() - started < BOOT_TIMEOUT_MS) {
        if (vm.exitCode !== null) throw new Error(`qemu exited with code ${vm.exitCode} before answering`);
        page = await get(`http://127.0.0.1:${port}/`);
        if (!page) await new Promise((r) => setTimeout(r, 200));
      }
      const firstResponseMs = Math.round(performance.now() - started);
      expect(page, `no HTTP answer within ${BOOT_TIMEOUT_MS / 1000}s`).toBeDefined();
      expect(page!.status).toBe(200);
      expect(page!.body).toBe(INDEX);

      // httpd runs as www (1000:1000); the CGI inherits its identity, the hostname and the env.
      const who = await get(`http://127.0.0.1:${port}/cgi-bin/whoami`);
      expect(who?.body.trim()).toBe(`uid=1000 gid=1000 host=${HOSTNAME} greeting=it's a "VM" $(not run)`);
      console.log(
        `[boot e2e] ${kvm ? "kvm" : "tcg"}: first HTTP response ${firstResponseMs} ms after launch`,
      );

      await qmp(qmpSocket, ["qmp_capabilities", "quit"]);
      expect(await exited(vm, 10_000), "qemu exits after QMP quit").toBe(true);
      expect(serial).not.toContain("kiln-initramfs:");
    } finally {
      if (vm.exitCode === null && vm.signalCode === null && vm.pid !== undefined) {
        process.kill(vm.pid, "SIGKILL");
        await exited(vm, 5_000);
      }
    }
  });
});
