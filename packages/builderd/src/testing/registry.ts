/**
 * A real OCI registry for tests: Debian's `docker-registry` (CNCF distribution 2.8) on a free
 * loopback port with filesystem storage in a temp dir — anonymous, with htpasswd (bcrypt) Basic
 * auth, or with token auth backed by a small token server that signs RS256 JWTs (x5c header) with
 * a throwaway key whose self-signed certificate is the registry's rootcertbundle. Fixtures are
 * pushed with skopeo. Child processes are killed on stop(), and on process exit as a last resort.
 */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { createHash, createPrivateKey, randomBytes, sign, X509Certificate } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";

const run = promisify(execFile);

export interface TestRegistry {
  /** "127.0.0.1:PORT" */
  host: string;
  /** The registry's storage root (distribution's filesystem driver layout). */
  dataDir: string;
  /** The file holding a blob's bytes in the registry's storage (to corrupt it in tests). */
  blobPath(digest: string): string;
  /** Set with `token: true`. */
  tokenServer?: TestTokenServer;
  stop(): Promise<void>;
}

export interface TestTokenServer {
  /** "127.0.0.1:PORT" */
  host: string;
  realm: string;
  service: string;
  /** Token requests served (successful or not). */
  requests: number;
  /** Issues a token directly (for tests that pass a ready-made bearer token). */
  issue(scopes: string[], subject?: string): string;
}

const children = new Set<ChildProcess>();
process.once("exit", () => {
  for (const c of children) if (c.exitCode === null && c.pid) process.kill(c.pid, "SIGKILL");
});

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const addr = srv.address();
      srv.close(() => (typeof addr === "object" && addr ? resolve(addr.port) : reject(new Error("no port"))));
    });
  });
}

const b64url = (b: Buffer | string) => Buffer.from(b).toString("base64url");

async function startTokenServer(
  dir: string,
  creds: { username: string; password: string } | undefined,
): Promise<TestTokenServer & { certFile: string; issuer: string; close(): Promise<void> }> {
  const keyFile = path.join(dir, "token.key");
  const certFile = path.join(dir, "token.crt");
  await run("openssl", [
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-days",
    "2",
    "-subj",
    "/CN=kiln-test-token-issuer",
    "-keyout",
    keyFile,
    "-out",
    certFile,
  ]);
  const key = createPrivateKey(fs.readFileSync(keyFile));
  const der = new X509Certificate(fs.readFileSync(certFile)).raw;
  const service = "kiln-test-registry";
  const issuer = "kiln-test-issuer";

  const issue = (scopes: string[], subject = "") => {
    const now = Math.floor(Date.now() / 1000);
    const access = scopes
      .map((s) => /^repository:(.+):([a-z,*]+)$/.exec(s))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => ({ type: "repository", name: m[1], actions: (m[2] ?? "").split(",") }));
    const header = b64url(JSON.stringify({ typ: "JWT", alg: "RS256", x5c: [der.toString("base64")] }));
    const claims = b64url(
      JSON.stringify({
        iss: issuer,
        sub: subject,
        aud: service,
        exp: now + 300,
        nbf: now - 10,
        iat: now,
        jti: randomBytes(8).toString("hex"),
        access,
      }),
    );
    const signature = sign("sha256", Buffer.from(`${header}.${claims}`), key);
    return `${header}.${claims}.${b64url(signature)}`;
  };

  const state = { requests: 0 };
  const server = http.createServer((req, res) => {
    state.requests++;
    const url = new URL(req.url ?? "/", "http://x");
    let subject = "";
    if (creds) {
      const given = req.headers.authorization ?? "";
      const expected = `Basic ${Buffer.from(`${creds.username}:${creds.password}`).toString("base64")}`;
      if (given !== expected) {
        res.writeHead(401, { "content-type": "application/json" });
        res.end(JSON.stringify({ details: "bad credentials" }));
        return;
      }
      subject = creds.username;
    }
    const token = issue(url.searchParams.getAll("scope"), subject);
    res.writeHead(200, { "content-type": "application/json" });
    res.end(
      JSON.stringify({ token, access_token: token, expires_in: 300, issued_at: new Date().toISOString() }),
    );
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const addr = server.address() as net.AddressInfo;
  const host = `127.0.0.1:${addr.port}`;
  return {
    host,
    realm: `http://${host}/token`,
    service,
    issuer,
    certFile,
    get requests() {
      return state.requests;
    },
    issue,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

export async function startTestRegistry(opts?: {
  htpasswd?: { username: string; password: string };
  token?: true;
}): Promise<TestRegistry> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "kiln-registry-"));
  const dataDir = path.join(dir, "data");
  fs.mkdirSync(dataDir);
  let tokenServer: Awaited<ReturnType<typeof startTokenServer>> | undefined;
  let child: ChildProcess | undefined;
  const stop = async () => {
    if (child && child.exitCode === null && child.signalCode === null) {
      const exited = new Promise<void>((resolve) => child?.once("exit", () => resolve()));
      child.kill("SIGTERM");
      const timer = setTimeout(() => child?.kill("SIGKILL"), 3000);
      await exited;
      clearTimeout(timer);
    }
    if (child) children.delete(child);
    await tokenServer?.close();
    fs.rmSync(dir, { recursive: true, force: true });
  };
  try {
    let auth = "";
    if (opts?.token) {
      tokenServer = await startTokenServer(dir, opts.htpasswd);
      auth = [
        "auth:",
        "  token:",
        `    realm: ${tokenServer.realm}`,
        `    service: ${tokenServer.service}`,
        `    issuer: ${tokenServer.issuer}`,
        `    rootcertbundle: ${tokenServer.certFile}`,
      ].join("\n");
    } else if (opts?.htpasswd) {
      const { stdout } = await run("htpasswd", ["-Bbn", opts.htpasswd.username, opts.htpasswd.password]);
      fs.writeFileSync(path.join(dir, "htpasswd"), stdout.trim() + "\n");
      auth = ["auth:", "  htpasswd:", "    realm: kiln-test", `    path: ${path.join(dir, "htpasswd")}`].join(
        "\n",
      );
    }
    const port = await freePort();
    const config = [
      "version: 0.1",
      "log:",
      "  level: error",
      "  accesslog:",
      "    disabled: true",
      "storage:",
      "  filesystem:",
      `    rootdirectory: ${dataDir}`,
      "  delete:",
      "    enabled: true",
      "  maintenance:",
      "    uploadpurging:",
      "      enabled: false",
      "http:",
      `  addr: 127.0.0.1:${port}`,
      `  secret: ${randomBytes(16).toString("hex")}`,
      auth,
    ].join("\n");
    fs.writeFileSync(path.join(dir, "config.yml"), `${config}\n`);
    const proc = spawn("docker-registry", ["serve", path.join(dir, "config.yml")], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    child = proc;
    children.add(proc);
    let stderr = "";
    proc.stderr?.on("data", (d: Buffer) => {
      stderr = (stderr + d.toString()).slice(-4000);
    });
    const host = `127.0.0.1:${port}`;
    await waitForRegistry(host, proc, () => stderr);
    return {
      host,
      dataDir,
      blobPath: (digest) => {
        const hex = digest.replace(/^sha256:/, "");
        return path.join(dataDir, "docker/registry/v2/blobs/sha256", hex.slice(0, 2), hex, "data");
      },
      ...(tokenServer ? { tokenServer } : {}),
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

async function waitForRegistry(host: string, proc: ChildProcess, stderr: () => string): Promise<void> {
  const deadline = Date.now() + 20_000;
  while (Date.now() < deadline) {
    if (proc.exitCode !== null) throw new Error(`docker-registry exited with ${proc.exitCode}: ${stderr()}`);
    const status = await new Promise<number>((resolve) => {
      const req = http.get(`http://${host}/v2/`, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      });
      req.on("error", () => resolve(0));
      req.setTimeout(1000, () => req.destroy());
    });
    if (status === 200 || status === 401) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`docker-registry on ${host} did not answer /v2/ within 20 s: ${stderr()}`);
}

/**
 * Pushes `oci:layoutDir:tag` to `docker://registryHost/repo:tag` with skopeo, digests preserved.
 * skopeo 1.9's oci: transport ignores Docker media types inside an OCI layout, so images written
 * with `dockerMediaTypes` are pushed over the registry API instead (same bytes, same digests).
 */
export async function pushLayout(
  layoutDir: string,
  tag: string,
  registryHost: string,
  repo: string,
  opts?: { all?: boolean; creds?: string },
): Promise<void> {
  const index = JSON.parse(fs.readFileSync(path.join(layoutDir, "index.json"), "utf8")) as {
    manifests: Array<{ mediaType: string; digest: string; annotations?: Record<string, string> }>;
  };
  const top = index.manifests.find((m) => m.annotations?.["org.opencontainers.image.ref.name"] === tag);
  if (top?.mediaType.startsWith("application/vnd.docker.")) {
    await pushOverApi(layoutDir, top, registryHost, repo, tag, opts?.creds);
    return;
  }
  const args = ["copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests"];
  if (opts?.all) args.push("--all");
  if (opts?.creds) args.push("--dest-creds", opts.creds);
  args.push(`oci:${layoutDir}:${tag}`, `docker://${registryHost}/${repo}:${tag}`);
  // An accept-anything policy keeps skopeo independent of the machine's /etc/containers.
  const policy = path.join(os.tmpdir(), "kiln-test-skopeo-policy.json");
  if (!fs.existsSync(policy)) {
    fs.writeFileSync(policy, JSON.stringify({ default: [{ type: "insecureAcceptAnything" }] }));
  }
  try {
    await run("skopeo", ["--policy", policy, ...args], { timeout: 120_000 });
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`skopeo ${args.join(" ")} failed: ${e.stderr || e.message}`);
  }
}

interface ApiResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

function request(
  method: string,
  url: string,
  headers: Record<string, string>,
  body?: Buffer,
): Promise<ApiResponse> {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("end", () =>
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }),
      );
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(body);
  });
}

/** The registry API's push: monolithic blob uploads, then manifests (children before indexes). */
async function pushOverApi(
  layoutDir: string,
  top: { mediaType: string; digest: string },
  host: string,
  repo: string,
  tag: string,
  creds: string | undefined,
): Promise<void> {
  const base = `http://${host}/v2/${repo}`;
  let authorization: string | undefined;
  const blob = (digest: string) => fs.readFileSync(path.join(layoutDir, "blobs", "sha256", digest.slice(7)));
  const call = async (method: string, url: string, headers: Record<string, string>, body?: Buffer) => {
    let res = await request(method, url, authorization ? { ...headers, authorization } : headers, body);
    if (res.status !== 401) return res;
    const challenge = String(res.headers["www-authenticate"] ?? "");
    const basic = creds ? `Basic ${Buffer.from(creds).toString("base64")}` : undefined;
    if (challenge.startsWith("Bearer")) {
      const param = (k: string) => new RegExp(`${k}="([^"]*)"`).exec(challenge)?.[1] ?? "";
      const realm = new URL(param("realm"));
      realm.searchParams.set("service", param("service"));
      realm.searchParams.set("scope", `repository:${repo}:pull,push`);
      const t = await request("GET", realm.toString(), basic ? { authorization: basic } : {});
      authorization = `Bearer ${(JSON.parse(t.body.toString()) as { token: string }).token}`;
    } else {
      authorization = basic;
    }
    res = await request(method, url, authorization ? { ...headers, authorization } : headers, body);
    return res;
  };
  const pushBlob = async (digest: string) => {
    const start = await call("POST", `${base}/blobs/uploads/`, {});
    if (start.status !== 202) throw new Error(`starting upload of ${digest}: ${start.status} ${start.body}`);
    const location = new URL(String(start.headers.location), `http://${host}`);
    location.searchParams.set("digest", digest);
    const data = blob(digest);
    const put = await call(
      "PUT",
      location.toString(),
      {
        "content-type": "application/octet-stream",
        "content-length": String(data.length),
      },
      data,
    );
    if (put.status !== 201) throw new Error(`uploading ${digest}: ${put.status} ${put.body}`);
  };
  const pushManifest = async (desc: { mediaType: string; digest: string }, reference: string) => {
    const body = blob(desc.digest);
    const doc = JSON.parse(body.toString()) as {
      manifests?: Array<{ mediaType: string; digest: string }>;
      config?: { digest: string };
      layers?: Array<{ digest: string }>;
    };
    for (const child of doc.manifests ?? []) await pushManifest(child, child.digest);
    if (doc.config) await pushBlob(doc.config.digest);
    for (const layer of doc.layers ?? []) await pushBlob(layer.digest);
    const res = await call(
      "PUT",
      `${base}/manifests/${reference}`,
      {
        "content-type": desc.mediaType,
        "content-length": String(body.length),
      },
      body,
    );
    if (res.status !== 201) throw new Error(`putting manifest ${desc.digest}: ${res.status} ${res.body}`);
  };
  await pushManifest(top, tag);
}

/** sha256 of a file, as "sha256:…". */
export function fileDigest(file: string): string {
  return `sha256:${createHash("sha256").update(fs.readFileSync(file)).digest("hex")}`;
}
