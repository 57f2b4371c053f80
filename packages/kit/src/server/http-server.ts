import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import { Duplex } from "node:stream";

export type RequestHandler = (
  req: http.IncomingMessage | http2.Http2ServerRequest,
  res: http.ServerResponse | http2.Http2ServerResponse,
) => void;

export interface HttpServer {
  /** The bound address (useful with port 0). */
  readonly address: { host: string; port: number };
  /** Calls currently being served. */
  inFlight(): number;
  /**
   * Stop accepting connections and wait up to `timeoutMs` for in-flight requests to finish.
   * Resolves true when all finished in time.
   */
  drain(timeoutMs: number): Promise<boolean>;
  /** Close every remaining connection (after `drain`, or at once). */
  close(): Promise<void>;
}

const H2_PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");

/**
 * One port serving HTTP/1.1 and cleartext HTTP/2 (h2c with prior knowledge, which gRPC clients
 * use). Node's http2 server only negotiates HTTP/1.1 over TLS, so each new connection is routed by
 * its first bytes: the HTTP/2 connection preface goes to the http2 server, anything else to http.
 */
export async function listen(opts: {
  host: string;
  port: number;
  handler: RequestHandler;
}): Promise<HttpServer> {
  const sockets = new Set<net.Socket>();
  const sessions = new Set<http2.ServerHttp2Session>();
  let active = 0;
  let closing = false;
  let idleWaiters: Array<() => void> = [];

  const tracked: RequestHandler = (req, res) => {
    active++;
    if (closing && "setHeader" in res && !(res instanceof http2.Http2ServerResponse)) {
      res.setHeader("connection", "close");
    }
    res.once("close", () => {
      active--;
      if (active === 0) {
        for (const w of idleWaiters) w();
        idleWaiters = [];
      }
    });
    opts.handler(req, res);
  };

  const h1 = http.createServer({ keepAliveTimeout: 5_000 }, tracked as http.RequestListener);
  const h2 = http2.createServer(
    {},
    tracked as (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => void,
  );
  h2.on("session", (s) => {
    sessions.add(s);
    s.once("close", () => sessions.delete(s));
    if (closing) s.close();
  });

  // noDelay: without it Nagle holds back a response's last small write until the client's
  // delayed ACK, ~40 ms per HTTP/2 call (http sets it on its own sockets; h2 gets ours wrapped).
  const server = net.createServer({ noDelay: true }, (socket) => {
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
    socket.on("error", () => socket.destroy());
    let buffered = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      buffered = Buffer.concat([buffered, chunk]);
      const n = Math.min(buffered.length, H2_PREFACE.length);
      const isH2 = buffered.subarray(0, n).equals(H2_PREFACE.subarray(0, n));
      if (isH2 && buffered.length < H2_PREFACE.length) return; // need more bytes to decide
      socket.off("data", onData);
      if (isH2) {
        h2.emit("connection", replaying(socket, buffered));
      } else {
        socket.pause();
        socket.unshift(buffered);
        h1.emit("connection", socket);
        socket.resume();
      }
    };
    socket.on("data", onData);
  });

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(opts.port, opts.host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  const addr = server.address() as net.AddressInfo;

  return {
    address: { host: opts.host, port: addr.port },
    inFlight: () => active,
    async drain(timeoutMs) {
      if (!closing) {
        closing = true;
        server.close();
        // HTTP/2: GOAWAY lets open streams finish but refuses new ones.
        for (const s of sessions) s.close();
        // HTTP/1.1: idle keep-alive sockets close now, busy ones after their response.
        h1.closeIdleConnections();
      }
      if (active === 0) return true;
      return new Promise<boolean>((resolve) => {
        const timer = setTimeout(() => resolve(false), timeoutMs);
        idleWaiters.push(() => {
          clearTimeout(timer);
          resolve(true);
        });
      });
    },
    async close() {
      if (!closing) {
        closing = true;
        server.close();
      }
      for (const s of sessions) s.destroy();
      for (const socket of sockets) socket.destroy();
    },
  };
}

/**
 * The http2 server reads a net.Socket's native handle directly, so bytes already read cannot be
 * unshifted back. Handing it a JS stream that replays them first makes it read through JS instead.
 */
function replaying(socket: net.Socket, head: Buffer): Duplex {
  socket.pause();
  const stream = new Duplex({
    read() {
      socket.resume();
    },
    write(chunk, encoding, callback) {
      socket.write(chunk, encoding, callback);
    },
    final(callback) {
      socket.end(callback);
    },
    destroy(err, callback) {
      socket.destroy(err ?? undefined);
      callback(err);
    },
  });
  stream.push(head);
  socket.on("data", (chunk) => {
    if (!stream.push(chunk)) socket.pause();
  });
  socket.once("end", () => stream.push(null));
  socket.once("close", () => stream.destroy());
  return stream;
}
