/**
 * Test images shared by the suites that build and boot real workloads (builderd's QEMU e2e,
 * metald's lifecycle tests): a busybox-httpd image made from the host's busybox-static.
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { type EntrySpec, type ImageSpec, writeOciLayout } from "./oci-layout.js";
import { pushLayout } from "./registry.js";

export const HTTPD_INDEX = "<h1>hello from a kiln microvm</h1>\n";
export const HTTPD_PORT = 8080;

/**
 * busybox + applets and a `www` user; the site (an index page and a CGI script reporting the
 * workload's uid, hostname and $GREETING), docs and a cache to optimize away. httpd runs as www
 * on port 8080.
 */
export function busyboxHttpdImage(): ImageSpec {
  const applets = execFileSync("/bin/busybox", ["--list"], { encoding: "utf8" }).split("\n").filter(Boolean);
  const base: EntrySpec[] = [
    { type: "dir", path: "bin" },
    { type: "file", path: "bin/busybox", content: fs.readFileSync("/bin/busybox"), mode: 0o755 },
    ...applets
      .filter((a) => a !== "busybox")
      .map((a): EntrySpec => ({ type: "symlink", path: `bin/${a}`, target: "busybox" })),
    { type: "dir", path: "etc" },
    {
      type: "file",
      path: "etc/passwd",
      content: "root:x:0:0:root:/root:/bin/sh\nwww:x:1000:1000:www:/www:/bin/sh\n",
    },
    { type: "file", path: "etc/group", content: "root:x:0:\nwww:x:1000:\n" },
  ];
  const site: EntrySpec[] = [
    { type: "dir", path: "www", uid: 1000, gid: 1000 },
    { type: "file", path: "www/index.html", content: HTTPD_INDEX },
    { type: "dir", path: "www/cgi-bin" },
    {
      type: "file",
      path: "www/cgi-bin/whoami",
      mode: 0o755,
      content:
        '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n"\necho "uid=$(id -u) gid=$(id -g) host=$(hostname) greeting=$GREETING"\n',
    },
    { type: "dir", path: "usr/share/doc/busybox" },
    { type: "file", path: "usr/share/doc/busybox/README", content: "docs" },
    { type: "dir", path: "var/cache/apt" },
    { type: "file", path: "var/cache/apt/pkgcache.bin", content: "cache" },
  ];
  return {
    layers: [base, site],
    config: {
      Cmd: ["httpd", "-f", "-v", "-p", String(HTTPD_PORT), "-h", "/www"],
      Env: ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", `GREETING=it's a "VM" $(not run)`],
      WorkingDir: "/www",
      User: "www",
      ExposedPorts: { [`${HTTPD_PORT}/tcp`]: {} },
    },
  };
}

/** Writes the image as an OCI layout in `dir` and pushes it to `registryHost` as `repo:1`. */
export async function pushBusyboxHttpd(
  dir: string,
  registryHost: string,
  repo = "busybox-httpd",
): Promise<string> {
  const layout = path.join(dir, `${repo}-layout`);
  await writeOciLayout(layout, [{ tag: "1", image: busyboxHttpdImage() }]);
  await pushLayout(layout, "1", registryHost, repo);
  return `docker://${registryHost}/${repo}:1`;
}
