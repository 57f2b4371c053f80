import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { FailedPreconditionError, InvalidArgumentError } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import { injectInit, type WorkloadSpec } from "./init.js";

const dirs: Array<{ remove(): void }> = [];
afterEach(() => {
  for (const d of dirs.splice(0)) d.remove();
});

/** A minimal image: busybox with a few applets, /etc/passwd and /etc/group with a `www` user. */
function makeRootfs(): string {
  const dir = tempDir("kiln-init-");
  dirs.push(dir);
  const root = path.join(dir.path, "root");
  for (const d of ["bin", "etc", "out"]) fs.mkdirSync(path.join(root, d), { recursive: true });
  fs.copyFileSync("/bin/busybox", path.join(root, "bin/busybox"));
  fs.chmodSync(path.join(root, "bin/busybox"), 0o755);
  for (const a of ["sh", "id", "hostname", "ip", "cat", "env", "pwd", "printf"]) {
    fs.symlinkSync("busybox", path.join(root, "bin", a));
  }
  fs.writeFileSync(
    path.join(root, "etc/passwd"),
    "root:x:0:0::/root:/bin/sh\nwww:x:1000:1001::/www:/bin/sh\n",
  );
  fs.writeFileSync(path.join(root, "etc/group"), "root:x:0:\nweb:x:1001:\nstaff:x:50:\n");
  fs.chmodSync(path.join(root, "out"), 0o777);
  return root;
}

const base: WorkloadSpec = { entrypoint: [], cmd: ["/bin/true"], env: {}, workingDir: "/", user: "" };

describe("injectInit", () => {
  it("writes tini, busybox, the init script and workload.json under /.kiln", async () => {
    const root = makeRootfs();
    await injectInit(root, { ...base, cmd: ["httpd", "-f"], user: "www" });
    const kiln = path.join(root, ".kiln");
    for (const [name, mode] of [
      ["tini", 0o755],
      ["busybox", 0o755],
      ["init", 0o755],
      ["workload.json", 0o644],
    ] as const) {
      const st = fs.statSync(path.join(kiln, name));
      expect(st.mode & 0o7777, name).toBe(mode);
      expect([st.uid, st.gid], name).toEqual([0, 0]);
    }
    expect(fs.readFileSync(path.join(kiln, "tini"))).toEqual(fs.readFileSync("/usr/bin/tini-static"));
    const init = fs.readFileSync(path.join(kiln, "init"), "utf8");
    expect(init.startsWith("#!/.kiln/busybox sh\n")).toBe(true);
    expect(init).toContain("nsenter -S 1000 -G 1001 -F");
    const described = JSON.parse(fs.readFileSync(path.join(kiln, "workload.json"), "utf8"));
    expect(described).toMatchObject({
      cmd: ["httpd", "-f"],
      user: "www",
      resolvedUser: { uid: 1000, gid: 1001 },
    });
    for (const d of ["proc", "sys", "dev", "run"])
      expect(fs.statSync(path.join(root, d)).isDirectory()).toBe(true);
  });

  it("replaces an image's /.kiln symlink without writing through it", async () => {
    const root = makeRootfs();
    const outside = tempDir("kiln-outside-");
    dirs.push(outside);
    fs.writeFileSync(path.join(outside.path, "init"), "mine");
    fs.symlinkSync(outside.path, path.join(root, ".kiln"));
    await injectInit(root, base);
    expect(fs.lstatSync(path.join(root, ".kiln")).isDirectory()).toBe(true);
    expect(fs.readdirSync(outside.path)).toEqual(["init"]);
    expect(fs.readFileSync(path.join(outside.path, "init"), "utf8")).toBe("mine");
  });

  it("fails the build for a user the image does not have, or nothing to run", async () => {
    const root = makeRootfs();
    await expect(injectInit(root, { ...base, user: "nobody" })).rejects.toThrow(
      /"nobody" is not in the image's \/etc\/passwd/,
    );
    await expect(injectInit(root, { ...base, cmd: [] })).rejects.toBeInstanceOf(InvalidArgumentError);
  });

  it("refuses a dynamically linked busybox, which would not run inside other images", async () => {
    const root = makeRootfs();
    await expect(injectInit(root, base, { busyboxPath: "/usr/bin/ls" })).rejects.toBeInstanceOf(
      FailedPreconditionError,
    );
    await expect(injectInit(root, base, { tiniPath: "/nonexistent/tini" })).rejects.toThrow(
      /install the tini-static package/,
    );
  });
});

/**
 * Runs the generated /.kiln/init as PID 1 of fresh pid, mount, UTS, network and IPC namespaces,
 * chrooted into the rootfs: the same script the VM runs, minus the VM. Its final `poweroff -f`
 * only ends the pid namespace (reboot(2) from a non-initial pid namespace never touches the host).
 */
function runInitInNamespaces(root: string, cmdline: string): { stdout: string; stderr: string } {
  const cmdlineFile = path.join(path.dirname(root), "cmdline");
  fs.writeFileSync(cmdlineFile, `${cmdline}\n`);
  const wrapper = [
    "set -e",
    '[ "$$" -eq 1 ] || { echo "not PID 1 of a new pid namespace; refusing"; exit 99; }',
    'mount -t proc proc "$ROOT/proc"',
    'mount --bind "$CMDLINE" "$ROOT/proc/cmdline"',
    "ip link add eth0 type veth peer name peer0",
    'exec chroot "$ROOT" /.kiln/init',
  ].join("\n");
  const r = spawnSync(
    "unshare",
    [
      "--pid",
      "--fork",
      "--mount",
      "--uts",
      "--net",
      "--ipc",
      "--propagation",
      "private",
      "sh",
      "-c",
      wrapper,
    ],
    {
      env: { ROOT: root, CMDLINE: cmdlineFile, PATH: "/usr/sbin:/usr/bin:/sbin:/bin" },
      encoding: "utf8",
      timeout: 20_000,
    },
  );
  return { stdout: r.stdout, stderr: r.stderr };
}

describe("the generated init, run as PID 1 in namespaces", () => {
  const hostile = [
    "",
    "two words",
    "it's",
    '"dq"',
    "$(touch /out/pwned)",
    "`touch /out/pwned`",
    "$HOME",
    "new\nline",
    "back\\slash",
    "*",
    "-n",
    "☃ 日本語",
  ];

  it("runs the workload with its argv, exact env, workdir, user, hostname and network, then powers off", async () => {
    const root = makeRootfs();
    fs.writeFileSync(
      path.join(root, "bin/report"),
      [
        "#!/bin/busybox sh",
        "printf '%s\\0' \"$@\" > /out/argv",
        "env > /out/env",
        "id -u > /out/uid; id -g > /out/gid; id -G > /out/groups",
        "pwd > /out/pwd",
        "hostname > /out/hostname",
        "ip -o -4 addr show dev eth0 > /out/addr",
        "ip route show default > /out/route",
        "cat /etc/resolv.conf > /out/resolv",
        "cat /proc/1/cmdline | tr '\\0' ' ' > /out/pid1",
        "grep -E '^Sig(Ign|Blk):' /proc/self/status > /out/signals",
        "exit 7",
        "",
      ].join("\n"),
    );
    fs.chmodSync(path.join(root, "bin/report"), 0o755);
    await injectInit(root, {
      entrypoint: ["report", hostile[0]!],
      cmd: hostile.slice(1),
      env: { PATH: "/bin", QUOTED: "a'b\"c$(x)`y`\nz", EMPTY: "" },
      workingDir: "/srv/my app",
      user: "www:staff",
    });

    const { stdout, stderr } = runInitInNamespaces(
      root,
      "console=ttyS0 root=/dev/vda kiln.hostname=web-1 kiln.ip=10.0.2.15/24 kiln.gw=10.0.2.2 kiln.dns=10.0.2.3,10.0.2.4 quiet",
    );
    const out = (f: string) => fs.readFileSync(path.join(root, "out", f), "utf8");
    expect(stdout, stderr).toContain("kiln-init: workload exited with status 7");
    expect(out("argv").split("\0").slice(0, -1)).toEqual(hostile);
    expect(fs.existsSync(path.join(root, "out/pwned"))).toBe(false);
    const env = out("env");
    expect(env).toContain("QUOTED=a'b\"c$(x)`y`\nz\n");
    // Exactly the spec's variables, plus what the workload's own shell sets (PWD, SHLVL).
    const names = env
      .split("\n")
      .map((l) => /^([A-Za-z_][A-Za-z0-9_]*)=/.exec(l)?.[1])
      .filter(Boolean)
      .sort();
    expect(names).toEqual(["EMPTY", "PATH", "PWD", "QUOTED", "SHLVL"]);
    expect(out("uid").trim()).toBe("1000");
    expect(out("gid").trim()).toBe("50");
    expect(out("groups").trim()).toBe("50");
    expect(out("pwd").trim()).toBe("/srv/my app");
    expect(out("hostname").trim()).toBe("web-1");
    expect(out("addr")).toContain("inet 10.0.2.15/24");
    expect(out("route")).toContain("default via 10.0.2.2 dev eth0");
    expect(out("resolv")).toBe("nameserver 10.0.2.3\nnameserver 10.0.2.4\n");
    // tini is PID 1 (reaping, forwarding signals); the workload ignores and blocks nothing.
    expect(out("pid1")).toBe("/.kiln/tini -g -- /.kiln/busybox sh /.kiln/init ");
    expect(out("signals")).toBe("SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n");
    expect(fs.readFileSync(path.join(root, "etc/hosts"), "utf8")).toContain("127.0.0.1\tlocalhost web-1");
  });

  it("forwards a stop signal sent to PID 1 to the workload, then powers off", async () => {
    const root = makeRootfs();
    fs.writeFileSync(
      path.join(root, "bin/stoppable"),
      [
        "#!/bin/busybox sh",
        "trap 'echo TERM > /out/term; exit 0' TERM",
        "kill -TERM 1",
        "sleep 10 & wait",
        "echo not stopped > /out/term",
        "",
      ].join("\n"),
    );
    fs.chmodSync(path.join(root, "bin/stoppable"), 0o755);
    await injectInit(root, { ...base, cmd: ["stoppable"], env: { PATH: "/bin" } });
    const started = Date.now();
    const { stdout, stderr } = runInitInNamespaces(root, "quiet");
    expect(stdout, stderr).toContain("kiln-init: workload exited with status 0");
    expect(fs.readFileSync(path.join(root, "out/term"), "utf8")).toBe("TERM\n");
    expect(Date.now() - started).toBeLessThan(8_000);
  });
});
