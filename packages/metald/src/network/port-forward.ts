import dgram from "node:dgram";
import net from "node:net";
import { FailedPreconditionError, type Logger } from "@kiln/kit";
import type { PortProtocol } from "./pool.js";

/**
 * Host ports forwarded to VM ports by a proxy inside metald: a listener on 127.0.0.1:<hostPort>
 * (and on the host's bind address) that opens a connection to <guestIp>:<containerPort> over the
 * router for each client.
 *
 * Why userspace rather than iptables DNAT: DNAT of locally generated traffic to 127.0.0.1 needs
 * `route_localnet` on the host's loopback and DNAT of external traffic needs the host to forward
 * (`ip_forward`), both host-wide changes plus rules in the host's nat table; with a proxy the
 * host is an endpoint on both sides, nothing in the host's kernel configuration changes, and the
 * same code serves every backend. The costs — a copy through metald and forwarders that live and
 * die with the process — are acceptable for per-VM app ingress; after a restart the manager calls
 * `forward` again from the port allocations it stored. The client address is not preserved
 * (the VM sees the router's uplink address).
 */
export interface ForwardSpec {
  hostPort: number;
  guestIp: string;
  containerPort: number;
  protocol?: PortProtocol;
}

export interface ActiveForward {
  vmId: string;
  hostPort: number;
  protocol: PortProtocol;
  target: string;
  /** Addresses listened on. */
  addresses: string[];
  /** Open client connections (TCP) or client sessions (UDP). */
  connections: number;
}

export interface PortForwarder {
  /** Starts forwarding; idempotent for the same VM and host port. Fails when the host port is taken. */
  forward(vmId: string, spec: ForwardSpec): Promise<void>;
  /** Stops all of the VM's forwards: listeners close and open connections are cut. Idempotent. */
  stop(vmId: string): Promise<void>;
  list(): ActiveForward[];
  /** Stops everything (service shutdown). */
  close(): Promise<void>;
}

export interface PortForwarderOptions {
  /** Addresses to listen on besides 127.0.0.1 (the host's configured bind address); `0.0.0.0` covers all. */
  bindAddresses?: readonly string[];
  /** Give up connecting to the VM after this long (default 5 s). */
  connectTimeoutMs?: number;
  /** UDP sessions idle this long are closed (default 60 s). */
  udpIdleMs?: number;
  logger?: Logger;
}

interface Forward extends ActiveForward {
  closeAll(): Promise<void>;
}

export function createPortForwarder(opts: PortForwarderOptions = {}): PortForwarder {
  const extra = (opts.bindAddresses ?? []).filter((a) => a && a !== "127.0.0.1");
  const addresses = extra.includes("0.0.0.0") ? ["0.0.0.0"] : ["127.0.0.1", ...new Set(extra)];
  const connectTimeoutMs = opts.connectTimeoutMs ?? 5_000;
  const udpIdleMs = opts.udpIdleMs ?? 60_000;
  const forwards = new Map<string, Forward[]>();

  async function startTcp(vmId: string, spec: ForwardSpec): Promise<Forward> {
    const clients = new Set<net.Socket>();
    const upstreams = new Set<net.Socket>();
    const servers: net.Server[] = [];
    const target = `${spec.guestIp}:${spec.containerPort}`;
    const fwd: Forward = {
      vmId,
      hostPort: spec.hostPort,
      protocol: "tcp",
      target,
      addresses,
      get connections() {
        return clients.size;
      },
      async closeAll() {
        for (const s of [...clients, ...upstreams]) s.destroy();
        await Promise.all(servers.map((srv) => new Promise<void>((resolve) => srv.close(() => resolve()))));
      },
    };
    const onClient = (client: net.Socket) => {
      // No Nagle on either side: a proxy must not hold back the endpoints' small writes for a
      // delayed ACK (~40 ms per request/response turn); they choose their own segmenting.
      const upstream = net.connect({
        host: spec.guestIp,
        port: spec.containerPort,
        timeout: connectTimeoutMs,
        noDelay: true,
      });
      clients.add(client);
      upstreams.add(upstream);
      upstream.once("connect", () => upstream.setTimeout(0));
      upstream.once("timeout", () =>
        upstream.destroy(new Error(`no answer from ${target} within ${connectTimeoutMs} ms`)),
      );
      const end = (err?: Error) => {
        if (err)
          opts.logger?.debug(
            { vm_id: vmId, host_port: spec.hostPort, err: err.message },
            "forwarded connection ended",
          );
        client.destroy();
        upstream.destroy();
      };
      client.once("error", end);
      upstream.once("error", end);
      client.once("close", () => {
        clients.delete(client);
        upstream.end();
      });
      upstream.once("close", () => {
        upstreams.delete(upstream);
        client.end();
      });
      client.pipe(upstream);
      upstream.pipe(client);
    };
    try {
      for (const host of addresses) {
        const srv = net.createServer({ pauseOnConnect: false, noDelay: true }, onClient);
        servers.push(srv);
        await new Promise<void>((resolve, reject) => {
          srv.once("error", reject);
          srv.listen({ host, port: spec.hostPort, exclusive: true }, () => {
            srv.off("error", reject);
            resolve();
          });
        });
        srv.on("error", (err) =>
          opts.logger?.warn({ vm_id: vmId, host_port: spec.hostPort, err }, "port forwarder error"),
        );
      }
    } catch (err) {
      await fwd.closeAll();
      throw listenError(spec, err);
    }
    return fwd;
  }

  async function startUdp(vmId: string, spec: ForwardSpec): Promise<Forward> {
    const listeners: dgram.Socket[] = [];
    // One upstream socket per client address, so replies find their way back.
    const sessions = new Map<string, { sock: dgram.Socket; timer?: NodeJS.Timeout }>();
    const target = `${spec.guestIp}:${spec.containerPort}`;
    const fwd: Forward = {
      vmId,
      hostPort: spec.hostPort,
      protocol: "udp",
      target,
      addresses,
      get connections() {
        return sessions.size;
      },
      async closeAll() {
        for (const s of sessions.values()) {
          clearTimeout(s.timer);
          s.sock.close();
        }
        sessions.clear();
        await Promise.all(listeners.map((l) => new Promise<void>((resolve) => l.close(() => resolve()))));
      },
    };
    try {
      for (const host of addresses) {
        const listener = dgram.createSocket("udp4");
        listeners.push(listener);
        listener.on("message", (msg, rinfo) => {
          const key = `${rinfo.address}:${rinfo.port}`;
          let s = sessions.get(key);
          if (!s) {
            const sock = dgram.createSocket("udp4");
            sock.on("message", (reply) => listener.send(reply, rinfo.port, rinfo.address));
            sock.on("error", () => undefined);
            s = { sock };
            sessions.set(key, s);
          }
          const session = s;
          clearTimeout(session.timer);
          session.timer = setTimeout(() => {
            sessions.delete(key);
            session.sock.close();
          }, udpIdleMs);
          session.timer.unref();
          session.sock.send(msg, spec.containerPort, spec.guestIp);
        });
        await new Promise<void>((resolve, reject) => {
          listener.once("error", reject);
          listener.bind({ address: host, port: spec.hostPort, exclusive: true }, () => {
            listener.off("error", reject);
            resolve();
          });
        });
        listener.on("error", (err) =>
          opts.logger?.warn({ vm_id: vmId, host_port: spec.hostPort, err }, "port forwarder error"),
        );
      }
    } catch (err) {
      await fwd.closeAll();
      throw listenError(spec, err);
    }
    return fwd;
  }

  async function stop(vmId: string): Promise<void> {
    const list = forwards.get(vmId) ?? [];
    forwards.delete(vmId);
    await Promise.all(list.map((f) => f.closeAll()));
  }

  return {
    async forward(vmId, spec) {
      const protocol = spec.protocol ?? "tcp";
      const existing = forwards.get(vmId) ?? [];
      const same = existing.find((f) => f.hostPort === spec.hostPort && f.protocol === protocol);
      if (same) {
        if (same.target === `${spec.guestIp}:${spec.containerPort}`) return;
        await same.closeAll();
        existing.splice(existing.indexOf(same), 1);
      }
      const fwd = protocol === "udp" ? await startUdp(vmId, spec) : await startTcp(vmId, spec);
      forwards.set(vmId, [...(forwards.get(vmId) ?? []), fwd]);
    },
    stop,
    list() {
      return [...forwards.values()]
        .flat()
        .map(({ vmId, hostPort, protocol, target, addresses: a, connections }) => ({
          vmId,
          hostPort,
          protocol,
          target,
          addresses: a,
          connections,
        }));
    },
    async close() {
      await Promise.all([...forwards.keys()].map(stop));
    },
  };
}

function listenError(spec: ForwardSpec, err: unknown): Error {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (code === "EADDRINUSE") {
    return new FailedPreconditionError(
      `host port ${spec.hostPort}/${spec.protocol ?? "tcp"} is in use by another process: release the VM's port allocation and allocate another`,
      { cause: err },
    );
  }
  return new FailedPreconditionError(
    `cannot listen on host port ${spec.hostPort}: ${(err as Error).message}`,
    { cause: err },
  );
}
