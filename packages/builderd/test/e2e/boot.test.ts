/**
 * Acceptance for issue #3 item 5: a busybox-httpd rootfs made by builderd's rootfs stage
 * (optimize → inject init → ext4) boots under QEMU microvm with the host kernel and Kiln's
 * initramfs, and its HTTP server answers from the host through a forwarded port.
 *
 * The rootfs is assembled by hand (the pull/extract pipeline is tested elsewhere); the workload
 * runs as the image's `www` user on port 8080, and a CGI script reports its uid and hostname so
 * the user switch and the kernel command line are checked inside the real VM.
 */
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { afterAll, beforeAll, describe, expect, it, onTestFailed } from "vitest";
import { findHostKernel } from "../../../assetmanagerd/src/kernel/host-kernel.js";
import { buildInitramfs } from "../../../assetmanagerd/src/kernel/initramfs.js";
import { hostTscKhz, kvmUsable, QEMU_BINARY, qemuArgs } from "../../../metald/src/backends/qemu/cmdline.js";
import { buildExt4 } from "../../src/rootfs/ext4.js";
import { injectInit } from "../../src/rootfs/init.js";
import { optimizeRootfs } from "../../src/rootfs/optimize.js";

const INDEX = "<h1>hello from a kiln microvm</h1>\n";
const HOSTNAME = "kiln-e2e";
const BOOT_TIMEOUT_MS = 60_000;

let work: { path: string; remove(): void };
let kernel: string;
let initrd: string;
let image: string;

/** The hand-made image: busybox + applets, a www user, a page and a CGI script. */
function makeRootfs(root: string): void {
  for (const d of ["bin", "etc", "www/cgi-bin", "usr/share/doc/busybox", "var/cache/apt"]) {
    fs.mkdirSync(path.join(root, d), { recursive: true });
  }
  fs.copyFileSync("/bin/busybox", path.join(root, "bin/busybox"));
  fs.chmodSync(path.join(root, "bin/busybox"), 0o755);
  const applets = execFileSync("/bin/busybox", ["--list"], { encoding: "utf8" }).split("\n").filter(Boolean);
  for (const a of applets) if (a !== "busybox") fs.symlinkSync("busybox", path.join(root, "bin", a));
  fs.writeFileSync(
    path.join(root, "etc/passwd"),
    "root:x:0:0:root:/root:/bin/sh\nwww:x:1000:1000:www:/www:/bin/sh\n",
  );
  fs.writeFileSync(path.join(root, "etc/group"), "root:x:0:\nwww:x:1000:\n");
  fs.writeFileSync(path.join(root, "www/index.html"), INDEX);
  fs.writeFileSync(
    path.join(root, "www/cgi-bin/whoami"),
    '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n"\necho "uid=$(id -u) gid=$(id -g) host=$(hostname) greeting=$GREETING"\n',
  );
  fs.chmodSync(path.join(root, "www/cgi-bin/whoami"), 0o755);
  fs.writeFileSync(path.join(root, "usr/share/doc/busybox/README"), "docs");
  fs.writeFileSync(path.join(root, "var/cache/apt/pkgcache.bin"), "cache");
}

beforeAll(async () => {
  work = tempDir("kiln-boot-e2e-");
  const host = await findHostKernel();
  kernel = host.vmlinuz;
  initrd = path.join(work.path, "initrd.img");
  await buildInitramfs({ modulesDir: host.modulesDir, out: initrd });

  const root = path.join(work.path, "rootfs");
  makeRootfs(root);
  const optimized = await optimizeRootfs(root, {
    removeDocs: true,
    removeCache: true,
    excludePatterns: [],
    preservePaths: [],
  });
  expect(optimized.removedEntries).toBe(4); // usr/share/doc/busybox + README, var/cache/apt + pkgcache.bin
  await injectInit(root, {
    entrypoint: [],
    cmd: ["httpd", "-f", "-v", "-p", "8080", "-h", "/www"],
    env: { PATH: "/usr/sbin:/usr/bin:/sbin:/bin", GREETING: 'it\'s a "VM" $(not run)' },
    workingDir: "/www",
    user: "www",
  });
  image = path.join(work.path, "rootfs.ext4");
  await buildExt4(root, image, { headroomBytes: 16 << 20 });
});

afterAll(() => {
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
