import dgram from "node:dgram";
import net from "node:net";
import { FailedPreconditionError } from "@kiln/kit";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import type { VmNetwork } from "./attach.js";
import { createPortPool, type PortPool } from "./pool.js";
import { createPortForwarder, type PortForwarder } from "./port-forward.js";
import {
  createTestNetwork,
  nodeInNetns,
  probeTcp,
  startTestServer,
  type TestNetwork,
  type TestServer,
} from "./testing.js";

describe("port forwarding", () => {
  let network: TestNetwork;
  let ports: PortPool;
  let forwarder: PortForwarder;
  let vmId: string;
  let vm: VmNetwork;
  let server: TestServer;

  beforeAll(async () => {
    network = await createTestNetwork();
    // A range of its own, away from other test files' ports.
    const first = 30000 + Math.floor(Math.random() * 20000);
    ports = createPortPool({ db: network.testDb.db, range: { first, last: first + 50 } });
    vmId = await network.testDb.addVm();
    vm = await network.attacher.attach({ vmId, egressAllowed: false }, { mode: "address" });
    server = await startTestServer(vm.netnsName, vm.guestIp, 8080, "served from the vm");
  });
  afterEach(async () => {
    await forwarder?.close();
    await ports.release(vmId);
  });
  afterAll(async () => {
    await server?.stop();
    await network?.attacher.detach(vmId);
    await network?.cleanup();
  });

  it("makes the VM's port answer at 127.0.0.1:<hostPort>, and stop() closes it", async () => {
    forwarder = createPortForwarder();
    const alloc = await ports.allocate(vmId, { containerPort: 8080 });
    await forwarder.forward(vmId, { hostPort: alloc.hostPort, guestIp: vm.guestIp, containerPort: 8080 });
    const before = server.connections;
    expect(await probeTcp(undefined, "127.0.0.1", alloc.hostPort)).toEqual({
      ok: true,
      data: "served from the vm\n",
    });
    expect(forwarder.list()).toEqual([
      expect.objectContaining({
        vmId,
        hostPort: alloc.hostPort,
        protocol: "tcp",
        target: `${vm.guestIp}:8080`,
      }),
    ]);
    // The VM sees the connection coming from the host's end of the router link.
    expect(await server.settled(before + 1)).toBe(before + 1);
    expect(server.peers.at(-1)).toBe(network.layout.uplink.host);

    await forwarder.stop(vmId);
    expect(forwarder.list()).toEqual([]);
    expect(await probeTcp(undefined, "127.0.0.1", alloc.hostPort)).toEqual({
      ok: false,
      code: "ECONNREFUSED",
    });
  });

  it("cuts open connections when the forward stops", async () => {
    forwarder = createPortForwarder();
    // A server that keeps connections open, to see them cut.
    const hold = await startTestServer(vm.netnsName, vm.guestIp, 8081, "x");
    try {
      const alloc = await ports.allocate(vmId, { containerPort: 8081 });
      await forwarder.forward(vmId, { hostPort: alloc.hostPort, guestIp: vm.guestIp, containerPort: 8081 });
      const sock = net.connect({ host: "127.0.0.1", port: alloc.hostPort });
      const closed = new Promise((resolve) => sock.once("close", resolve));
      sock.on("error", () => undefined);
      await new Promise((resolve) => sock.once("connect", resolve));
      await forwarder.stop(vmId);
      await closed;
      expect(sock.destroyed).toBe(true);
    } finally {
      await hold.stop();
    }
  });

  it("passes small writes on at once (no Nagle), so a reply in two writes is not held back", async () => {
    // The VM's server answers each "g" with "a", then "b" 2 ms later: a reply in two writes, as
    // HTTP servers write headers and body. With Nagle on the forwarder's sockets "b" waited for
    // the client's delayed ACK of "a", ~40 ms a turn.
    const child = nodeInNetns(
      vm.netnsName,
      `const net = require("node:net");
       const srv = net.createServer({ noDelay: true }, (s) => s.on("data", () => {
         s.write("a"); setTimeout(() => s.write("b"), 2);
       }));
       srv.listen(8082, ${JSON.stringify(vm.guestIp)}, () => process.stdout.write("ready\\n"));`,
    );
    try {
      let stderr = "";
      child.stderr!.on("data", (d) => {
        stderr += d;
      });
      await new Promise((resolve, reject) => {
        child.stdout!.once("data", resolve);
        child.once("exit", () => reject(new Error(`the VM's test server exited: ${stderr}`)));
      });
      forwarder = createPortForwarder();
      const alloc = await ports.allocate(vmId, { containerPort: 8082 });
      await forwarder.forward(vmId, { hostPort: alloc.hostPort, guestIp: vm.guestIp, containerPort: 8082 });
      const sock = net.connect({ host: "127.0.0.1", port: alloc.hostPort, noDelay: true });
      await new Promise((resolve) => sock.once("connect", resolve));
      const took: number[] = [];
      let got = "";
      let turnDone: () => void = () => {};
      sock.on("data", (d) => {
        got += d;
        if (got.endsWith("b")) turnDone();
      });
      // Past Linux's quick-ACK start of a connection, where ACKs are not delayed yet.
      for (let i = 0; i < 40; i++) {
        const t = performance.now();
        got = "";
        await new Promise<void>((resolve) => {
          turnDone = resolve;
          sock.write("g");
        });
        took.push(performance.now() - t);
      }
      sock.destroy();
      const late = took.slice(20).sort((a, b) => a - b);
      expect(late[10]).toBeLessThan(20);
    } finally {
      child.kill();
    }
  });

  it("listens on the configured bind address as well", async () => {
    // The uplink's host address stands in for the host's bind address (an address on this machine).
    forwarder = createPortForwarder({ bindAddresses: [network.layout.uplink.host] });
    const alloc = await ports.allocate(vmId, { containerPort: 8080 });
    await forwarder.forward(vmId, { hostPort: alloc.hostPort, guestIp: vm.guestIp, containerPort: 8080 });
    expect(forwarder.list()[0]?.addresses).toEqual(["127.0.0.1", network.layout.uplink.host]);
    expect(await probeTcp(undefined, network.layout.uplink.host, alloc.hostPort)).toMatchObject({ ok: true });
    expect(await probeTcp(undefined, "127.0.0.1", alloc.hostPort)).toMatchObject({ ok: true });
  });

  it("forwards UDP datagrams both ways", async () => {
    forwarder = createPortForwarder();
    const echo = nodeInNetns(
      vm.netnsName,
      `const s = require("node:dgram").createSocket("udp4");
       s.on("message", (m, r) => s.send(Buffer.concat([Buffer.from("echo:"), m]), r.port, r.address));
       s.bind(5353, "${vm.guestIp}", () => process.stdout.write("ready"));`,
    );
    try {
      await new Promise((resolve) => echo.stdout?.once("data", resolve));
      const alloc = await ports.allocate(vmId, { containerPort: 5353, protocol: "udp" });
      await forwarder.forward(vmId, {
        hostPort: alloc.hostPort,
        guestIp: vm.guestIp,
        containerPort: 5353,
        protocol: "udp",
      });
      const client = dgram.createSocket("udp4");
      try {
        const reply = new Promise<string>((resolve) => client.once("message", (m) => resolve(m.toString())));
        client.send("ping", alloc.hostPort, "127.0.0.1");
        expect(await reply).toBe("echo:ping");
      } finally {
        client.close();
      }
      expect(forwarder.list()).toEqual([expect.objectContaining({ protocol: "udp", connections: 1 })]);
    } finally {
      echo.kill("SIGKILL");
    }
  });

  it("refuses a host port something else listens on, and the pool skips it", async () => {
    forwarder = createPortForwarder();
    const squatter = net.createServer();
    await new Promise<void>((resolve) => squatter.listen(ports.range.first, "127.0.0.1", resolve));
    try {
      await expect(
        forwarder.forward(vmId, { hostPort: ports.range.first, guestIp: vm.guestIp, containerPort: 8080 }),
      ).rejects.toBeInstanceOf(FailedPreconditionError);
      const alloc = await ports.allocate(vmId, { containerPort: 8080 });
      expect(alloc.hostPort).not.toBe(ports.range.first);
    } finally {
      await new Promise((resolve) => squatter.close(resolve));
    }
  });

  it("closes the client's connection when nothing listens on the VM's port", async () => {
    forwarder = createPortForwarder({ connectTimeoutMs: 1000 });
    const alloc = await ports.allocate(vmId, { containerPort: 9999 });
    await forwarder.forward(vmId, { hostPort: alloc.hostPort, guestIp: vm.guestIp, containerPort: 9999 });
    // Nothing listens on 9999 in the VM: the client's connection is closed without data.
    expect(await probeTcp(undefined, "127.0.0.1", alloc.hostPort)).toEqual({ ok: true, data: "" });
  });
});
