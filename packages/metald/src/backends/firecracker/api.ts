import fs from "node:fs/promises";
import http from "node:http";
import nodePath from "node:path";
import { DeadlineExceededError, InternalError, UnavailableError } from "@kiln/kit";

/**
 * Firecracker's HTTP API over its unix socket, one function per path and method of its OpenAPI
 * definition (src/firecracker/swagger/firecracker.yaml; a copy is in testdata/, and the tests
 * check every request these functions send against it). Types mirror the definitions' fields.
 */

export interface MachineConfiguration {
  vcpu_count: number;
  mem_size_mib: number;
  smt?: boolean;
  track_dirty_pages?: boolean;
  huge_pages?: "None" | "Transparent" | "2M";
}

export interface BootSource {
  kernel_image_path: string;
  boot_args?: string;
  initrd_path?: string;
}

export interface TokenBucket {
  size: number;
  refill_time: number;
  one_time_burst?: number;
}

export interface RateLimiter {
  bandwidth?: TokenBucket;
  ops?: TokenBucket;
}

export interface Drive {
  drive_id: string;
  is_root_device: boolean;
  path_on_host?: string;
  is_read_only?: boolean;
  partuuid?: string;
  cache_type?: "Unsafe" | "Writeback";
  io_engine?: "Sync" | "Async";
  rate_limiter?: RateLimiter;
}

export interface PartialDrive {
  drive_id: string;
  path_on_host?: string;
  rate_limiter?: RateLimiter;
}

export interface NetworkInterface {
  iface_id: string;
  host_dev_name: string;
  guest_mac?: string;
  mtu?: number;
  rx_rate_limiter?: RateLimiter;
  tx_rate_limiter?: RateLimiter;
}

export interface Logger {
  log_path?: string;
  level?: "Error" | "Warning" | "Info" | "Debug" | "Trace" | "Off";
  show_level?: boolean;
  show_log_origin?: boolean;
  module?: string;
}

export interface Metrics {
  metrics_path: string;
  emit_id?: boolean;
  properties?: Record<string, string>;
}

export interface SerialDevice {
  serial_out_path?: string;
  rate_limiter?: TokenBucket;
}

export interface InstanceActionInfo {
  action_type: "FlushMetrics" | "InstanceStart" | "SendCtrlAltDel";
}

export interface Vm {
  state: "Paused" | "Resumed";
}

export interface InstanceInfo {
  app_name: string;
  id: string;
  state: "Not started" | "Running" | "Paused";
  vmm_version: string;
}

export interface FirecrackerVersion {
  firecracker_version: string;
}

/** A request Firecracker refused; `faultMessage` is its own explanation. */
export class FirecrackerApiError extends InternalError {
  constructor(
    readonly method: string,
    readonly path: string,
    readonly status: number,
    readonly faultMessage: string,
  ) {
    super(`Firecracker ${method} ${path} failed (HTTP ${status}): ${faultMessage}`);
  }
}

/** The API socket of one Firecracker process. */
export interface FirecrackerConnection {
  socketPath: string;
  timeoutMs: number;
}

export function firecrackerConnection(socketPath: string, timeoutMs = 10_000): FirecrackerConnection {
  return { socketPath, timeoutMs };
}

/** A unix socket address holds 107 bytes of path (sun_path, NUL-terminated). */
const MAX_SOCKET_PATH = 107;

/**
 * Runs `fn` with a path that reaches `socketPath` even when it is longer than a socket address
 * allows: through `/proc/self/fd/<fd of its directory>/<name>`. The jail's socket is deep in the
 * VM directory (`…/jail/firecracker/<id>/root/api.sock`), easily past 107 bytes; Firecracker
 * itself binds `/api.sock` inside its chroot and never sees the long form.
 */
export async function withSocketPath<T>(
  socketPath: string,
  fn: (reachable: string) => Promise<T>,
): Promise<T> {
  if (Buffer.byteLength(socketPath) <= MAX_SOCKET_PATH) return fn(socketPath);
  let dir: fs.FileHandle;
  try {
    dir = await fs.open(nodePath.dirname(socketPath), "r");
  } catch (err) {
    throw new UnavailableError(`cannot reach the socket ${socketPath}: ${(err as Error).message}`, {
      cause: err,
    });
  }
  try {
    return await fn(`/proc/self/fd/${dir.fd}/${nodePath.basename(socketPath)}`);
  } finally {
    await dir.close();
  }
}

/** One request; resolves with the parsed JSON body (undefined for 204). */
export function request<T>(
  c: FirecrackerConnection,
  method: "GET" | "PUT" | "PATCH",
  path: string,
  body?: object,
): Promise<T> {
  return withSocketPath(c.socketPath, (socketPath) => send<T>(c, socketPath, method, path, body));
}

function send<T>(
  c: FirecrackerConnection,
  socketPath: string,
  method: "GET" | "PUT" | "PATCH",
  path: string,
  body?: object,
): Promise<T> {
  const payload = body === undefined ? undefined : JSON.stringify(body);
  return new Promise<T>((resolve, reject) => {
    const req = http.request(
      {
        socketPath,
        // A connection per request: a pooled one could outlive the Firecracker process it went to.
        agent: false,
        method,
        path,
        headers: {
          accept: "application/json",
          ...(payload !== undefined
            ? { "content-type": "application/json", "content-length": Buffer.byteLength(payload) }
            : {}),
        },
        timeout: c.timeoutMs,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (d: Buffer) => chunks.push(d));
        res.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          const status = res.statusCode ?? 0;
          if (status >= 200 && status < 300) {
            try {
              resolve((text ? JSON.parse(text) : undefined) as T);
            } catch (err) {
              reject(
                new InternalError(`Firecracker ${method} ${path} answered with invalid JSON`, { cause: err }),
              );
            }
            return;
          }
          let fault = text;
          try {
            fault = (JSON.parse(text) as { fault_message?: string }).fault_message ?? text;
          } catch {
            // not JSON: keep the raw text
          }
          reject(new FirecrackerApiError(method, path, status, fault || "no detail"));
        });
      },
    );
    req.on("timeout", () =>
      req.destroy(
        new DeadlineExceededError(`Firecracker ${method} ${path} got no answer within ${c.timeoutMs} ms`),
      ),
    );
    req.on("error", (err) => {
      if (err instanceof DeadlineExceededError) return reject(err);
      reject(
        new UnavailableError(`cannot reach Firecracker at ${c.socketPath}: ${err.message}`, { cause: err }),
      );
    });
    req.end(payload);
  });
}

const seg = (s: string) => encodeURIComponent(s);

/** GET / (describeInstance): id, state ("Not started", "Running", "Paused"), version. */
export const describeInstance = (c: FirecrackerConnection) => request<InstanceInfo>(c, "GET", "/");

/** GET /version. */
export const getVersion = (c: FirecrackerConnection) => request<FirecrackerVersion>(c, "GET", "/version");

/** GET /machine-config. */
export const getMachineConfig = (c: FirecrackerConnection) =>
  request<MachineConfiguration>(c, "GET", "/machine-config");

/** PUT /machine-config (pre-boot). */
export const putMachineConfig = (c: FirecrackerConnection, body: MachineConfiguration) =>
  request<void>(c, "PUT", "/machine-config", body);

/** PUT /boot-source (pre-boot). */
export const putBootSource = (c: FirecrackerConnection, body: BootSource) =>
  request<void>(c, "PUT", "/boot-source", body);

/** PUT /drives/{drive_id} (pre-boot). */
export const putDrive = (c: FirecrackerConnection, body: Drive) =>
  request<void>(c, "PUT", `/drives/${seg(body.drive_id)}`, body);

/** PATCH /drives/{drive_id} (post-boot: new backing file or rate limiter). */
export const patchDrive = (c: FirecrackerConnection, body: PartialDrive) =>
  request<void>(c, "PATCH", `/drives/${seg(body.drive_id)}`, body);

/** PUT /network-interfaces/{iface_id} (pre-boot). */
export const putNetworkInterface = (c: FirecrackerConnection, body: NetworkInterface) =>
  request<void>(c, "PUT", `/network-interfaces/${seg(body.iface_id)}`, body);

/** PUT /logger. */
export const putLogger = (c: FirecrackerConnection, body: Logger) => request<void>(c, "PUT", "/logger", body);

/** PUT /metrics. */
export const putMetrics = (c: FirecrackerConnection, body: Metrics) =>
  request<void>(c, "PUT", "/metrics", body);

/** PUT /serial (pre-boot): where the guest's serial console goes. */
export const putSerial = (c: FirecrackerConnection, body: SerialDevice) =>
  request<void>(c, "PUT", "/serial", body);

/** PUT /actions: InstanceStart, SendCtrlAltDel, FlushMetrics. */
export const putAction = (c: FirecrackerConnection, body: InstanceActionInfo) =>
  request<void>(c, "PUT", "/actions", body);

/** PATCH /vm: Paused / Resumed. */
export const patchVm = (c: FirecrackerConnection, body: Vm) => request<void>(c, "PATCH", "/vm", body);

/** GET /vm/config: the whole configuration (for diagnostics). */
export const getVmConfig = (c: FirecrackerConnection) =>
  request<Record<string, unknown>>(c, "GET", "/vm/config");
