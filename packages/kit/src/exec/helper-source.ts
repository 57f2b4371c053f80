/**
 * The spawn helper's program (see spawner.ts), run as `node --input-type=module -e <source>` so
 * it needs no file of its own in either the source or the built layout. Plain JavaScript: it is
 * never type-checked, so it stays small. Messages over the IPC channel:
 *
 *   in:  { id, kind: "run", file, args, cwd?, env?, input?, timeoutMs, maxBuffer }
 *        { id, kind: "detached", file, args, cwd?, env?, logFile, newSession }
 *        { kind: "kill", target, signal }   (a run under way: its caller gave up)
 *   out: { id, kind: "done", code, signal, stdout, stderr, timedOut, error? }     (run)
 *        { id, kind: "spawned", pid } then { id, kind: "exited", code, signal }  (detached)
 *        { id, kind: "failed", error }                                           (detached)
 *
 * `error` is { code, message } when the program could not be started (ENOENT, EACCES).
 * The helper exits when its parent goes away (the IPC channel closes), and only then: it ignores
 * the signals a terminal or service manager sends to the parent's process group.
 */
export const HELPER_SOURCE = String.raw`
import { spawn } from "node:child_process";
import fs from "node:fs";

const send = (m) => { if (process.connected) process.send(m); };
const running = new Map();
const errorOf = (err) => ({ code: String(err.code ?? "EUNKNOWN"), message: err.message });

function run(m) {
  const child = spawn(m.file, m.args, { cwd: m.cwd, env: m.env ?? process.env, stdio: ["pipe", "pipe", "pipe"] });
  running.set(m.id, child);
  const out = [], err = [];
  let size = 0, timedOut = false, overflow = false, spawnError;
  const collect = (into) => (chunk) => {
    size += chunk.length;
    if (size > m.maxBuffer) { overflow = true; child.kill("SIGKILL"); return; }
    into.push(chunk);
  };
  child.stdout.on("data", collect(out));
  child.stderr.on("data", collect(err));
  child.stdin.on("error", () => {});
  child.stdin.end(m.input ?? undefined);
  const timer = m.timeoutMs > 0 ? setTimeout(() => { timedOut = true; child.kill("SIGKILL"); }, m.timeoutMs) : undefined;
  child.on("error", (e) => { spawnError = e; });
  child.on("close", (code, signal) => {
    clearTimeout(timer);
    running.delete(m.id);
    let stderr = Buffer.concat(err).toString("utf8");
    if (overflow) stderr += "\n(output exceeded " + m.maxBuffer + " bytes; the command was killed)";
    send({
      id: m.id, kind: "done", code, signal, timedOut: timedOut || overflow,
      stdout: Buffer.concat(out).toString("utf8"), stderr,
      ...(spawnError ? { error: errorOf(spawnError) } : {}),
    });
  });
}

function detached(m) {
  let fd;
  try {
    fd = fs.openSync(m.logFile, "a", 0o640);
  } catch (e) {
    return send({ id: m.id, kind: "failed", error: errorOf(e) });
  }
  const child = spawn(m.file, m.args, {
    cwd: m.cwd, env: m.env ?? process.env, stdio: ["ignore", fd, fd], detached: m.newSession,
  });
  fs.closeSync(fd);
  child.once("spawn", () => send({ id: m.id, kind: "spawned", pid: child.pid }));
  child.once("error", (e) => send({ id: m.id, kind: "failed", error: errorOf(e) }));
  child.once("exit", (code, signal) => send({ id: m.id, kind: "exited", code, signal }));
}

process.on("message", (m) => {
  try {
    if (m.kind === "run") run(m);
    else if (m.kind === "detached") detached(m);
    else if (m.kind === "kill") running.get(m.target)?.kill(m.signal);
  } catch (e) {
    send({ id: m.id, kind: m.kind === "run" ? "done" : "failed", code: null, signal: null, stdout: "", stderr: "", timedOut: false, error: errorOf(e) });
  }
});
process.on("disconnect", () => process.exit(0));
// Ctrl-C or a service manager signals the whole process group: the parent may still need the
// helper while it shuts down, and the helper ends when the parent does.
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) process.on(sig, () => {});
`;
