import net from "node:net";
import path from "node:path";
import { DeadlineExceededError, UnavailableError } from "@kiln/kit";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, describe, expect, it } from "vitest";
import { QmpClient, QmpCommandError, withQmp } from "./qmp.js";

/**
 * A QMP peer that speaks the protocol as QEMU does (greeting, capabilities negotiation, replies
 * carrying the command's id, events in between); the real QEMU is exercised by the e2e suite.
 */
type Handler = (
  cmd: { execute: string; arguments?: Record<string, unknown>; id?: string },
  send: (m: object) => void,
) => void;

const cleanups: Array<() => void> = [];
afterEach(() => {
  for (const c of cleanups.splice(0).reverse()) c();
});

async function fakeQemu(
  handler: Handler,
  opts: { greet?: boolean } = {},
): Promise<{ socket: string; received: string[] }> {
  const d = tempDir("kiln-qmp-");
  const socket = path.join(d.path, "qmp.sock");
  const received: string[] = [];
  const server = net.createServer((conn) => {
    const send = (m: object) => conn.write(`${JSON.stringify(m)}\r\n`);
    if (opts.greet !== false) {
      send({
        QMP: { version: { qemu: { major: 7, minor: 2, micro: 22 }, package: "test" }, capabilities: ["oob"] },
      });
    }
    let buf = "";
    let negotiated = false;
    conn.on("data", (d) => {
      buf += d.toString();
      for (let nl = buf.indexOf("\n"); nl >= 0; nl = buf.indexOf("\n")) {
        const cmd = JSON.parse(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
        received.push(cmd.execute);
        if (cmd.execute === "qmp_capabilities") {
          negotiated = true;
          send({ return: {}, id: cmd.id });
        } else if (!negotiated) {
          send({
            error: {
              class: "CommandNotFound",
              desc: "Expecting capabilities negotiation with 'qmp_capabilities'",
            },
            id: cmd.id,
          });
        } else handler(cmd, send);
      }
    });
  });
  await new Promise<void>((r) => server.listen(socket, r));
  cleanups.push(() => {
    server.close();
    d.remove();
  });
  return { socket, received };
}

describe("QmpClient", () => {
  it("negotiates capabilities, then matches replies to commands by id", async () => {
    const { socket, received } = await fakeQemu((cmd, send) => {
      // Out of order: the second reply arrives first, with an event between them.
      if (cmd.execute === "query-status")
        setTimeout(() => send({ return: { status: "running", running: true }, id: cmd.id }), 30);
      else {
        send({ event: "STOP", timestamp: { seconds: 1, microseconds: 0 } });
        send({ return: {}, id: cmd.id });
      }
    });
    const qmp = await QmpClient.connect(socket);
    cleanups.push(() => qmp.close());
    expect(qmp.greeting?.version.qemu.major).toBe(7);
    const events: string[] = [];
    qmp.on("event", (e) => events.push(e.event));
    const [status] = await Promise.all([
      qmp.execute<{ status: string }>("query-status"),
      qmp.execute("stop"),
    ]);
    expect(status.status).toBe("running");
    expect(events).toEqual(["STOP"]);
    expect(received).toEqual(["qmp_capabilities", "query-status", "stop"]);
  });

  it("passes arguments and turns QEMU's error into QmpCommandError", async () => {
    let args: unknown;
    const { socket } = await fakeQemu((cmd, send) => {
      args = cmd.arguments;
      send({ error: { class: "GenericError", desc: "Invalid parameter 'reboot'" }, id: cmd.id });
    });
    const err = await withQmp(socket, (q) => q.execute("set-action", { reboot: "reset" })).catch(
      (e: unknown) => e,
    );
    expect(args).toEqual({ reboot: "reset" });
    expect(err).toBeInstanceOf(QmpCommandError);
    expect((err as QmpCommandError).message).toBe(
      "QMP set-action failed: GenericError: Invalid parameter 'reboot'",
    );
  });

  it("waits for an event by name, and gives up after its timeout", async () => {
    const { socket } = await fakeQemu((cmd, send) => {
      send({ return: {}, id: cmd.id });
      setTimeout(() => send({ event: "SHUTDOWN", data: { guest: true, reason: "guest-shutdown" } }), 20);
    });
    await withQmp(socket, async (q) => {
      const ev = q.waitForEvent("SHUTDOWN", 2_000);
      await q.execute("send-key", { keys: [] });
      expect((await ev)?.data).toEqual({ guest: true, reason: "guest-shutdown" });
      expect(await q.waitForEvent("RESET", 50)).toBeUndefined();
    });
  });

  it("times out a command QEMU never answers, and rejects pending commands when QEMU goes away", async () => {
    let conn: ((m: object) => void) | undefined;
    const { socket } = await fakeQemu((_cmd, send) => {
      conn = send;
    });
    const qmp = await QmpClient.connect(socket, { commandTimeoutMs: 100 });
    await expect(qmp.execute("query-status")).rejects.toBeInstanceOf(DeadlineExceededError);
    const pending = qmp.execute("stop", undefined, { timeoutMs: 5_000 });
    expect(conn).toBeDefined();
    qmp.close();
    await expect(pending).rejects.toBeInstanceOf(UnavailableError);
    await expect(qmp.execute("cont")).rejects.toThrow(/closed/);
  });

  it("fails clearly without a greeting or without a socket", async () => {
    const { socket } = await fakeQemu(() => {}, { greet: false });
    await expect(QmpClient.connect(socket, { timeoutMs: 100 })).rejects.toThrow(/no QMP greeting/);
    await expect(QmpClient.connect("/nonexistent/qmp.sock")).rejects.toThrow(/\/nonexistent\/qmp.sock/);
  });
});
