/**
 * Test helpers (excluded from the build, like every *.suite.ts): a validator for requests against
 * Firecracker's OpenAPI definition (testdata/firecracker.yaml), and a fake Firecracker API server
 * on a unix socket that records every request and keeps the state Firecracker would report.
 *
 * Swagger 2.0 schemas are JSON Schema draft-04 plus a few annotations, so ajv-draft-04 checks
 * them once their `#/definitions/…` references point into one registered document. Firecracker's
 * parser rejects fields it does not know (serde `deny_unknown_fields`), so the converted object
 * schemas forbid additional properties: a misspelt field fails here as it would there.
 */
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";
import AjvModule, { type ValidateFunction } from "ajv-draft-04";
import { parse } from "yaml";
import { withSocketPath } from "./api.js";

export const FIRECRACKER_SPEC = fileURLToPath(new URL("./testdata/firecracker.yaml", import.meta.url));

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };
type JsonObject = { [k: string]: Json };

interface Operation {
  method: string;
  template: string;
  pattern: RegExp;
  params: string[];
  body?: { required: boolean; validate: ValidateFunction };
  responses: Map<string, ValidateFunction | undefined>;
}

export interface RecordedRequest {
  method: string;
  path: string;
  body: unknown;
}

export interface FirecrackerSpecValidator {
  readonly version: string;
  /** Problems with a request (empty when it conforms): unknown path or method, body errors, path/body id mismatch. */
  checkRequest(req: RecordedRequest): string[];
  /** Problems with a response the fake server gives, so the fake stays honest too. */
  checkResponse(method: string, path: string, status: number, body: unknown): string[];
  /** "METHOD /template" of every operation, for coverage reports. */
  operationOf(req: { method: string; path: string }): string | undefined;
}

/** Swagger-only annotations and object strictness, applied recursively to a schema. */
function toDraft04(schema: Json, refBase: string): Json {
  if (Array.isArray(schema)) return schema.map((s) => toDraft04(s, refBase));
  if (schema === null || typeof schema !== "object") return schema;
  const out: JsonObject = {};
  for (const [k, v] of Object.entries(schema)) {
    if (k === "example" || k === "readOnly") continue;
    if (k === "$ref" && typeof v === "string" && v.startsWith("#/definitions/")) out[k] = `${refBase}${v}`;
    else if (k === "properties" && v && typeof v === "object" && !Array.isArray(v)) {
      out[k] = Object.fromEntries(Object.entries(v).map(([p, s]) => [p, toDraft04(s, refBase)]));
    } else out[k] = toDraft04(v, refBase);
  }
  // A property schema that is only a $ref may carry a description next to it (ignored by draft-04
  // anyway); an object with declared properties gets no others.
  if ("properties" in out && !("additionalProperties" in out)) out.additionalProperties = false;
  return out;
}

export function loadFirecrackerSpec(file = FIRECRACKER_SPEC): FirecrackerSpecValidator {
  const doc = parse(fs.readFileSync(file, "utf8")) as {
    info: { version: string };
    definitions: JsonObject;
    paths: Record<
      string,
      Record<string, { parameters?: JsonObject[]; responses?: Record<string, { schema?: Json }> }>
    >;
  };
  const ajv = new AjvModule.default({ strict: false, allErrors: true, validateFormats: false });
  const definitions = Object.fromEntries(
    Object.entries(doc.definitions).map(([name, s]) => [name, toDraft04(s, "firecracker.json")]),
  );
  ajv.addSchema({ id: "firecracker.json", definitions }, "firecracker.json");

  const ops: Operation[] = [];
  for (const [template, methods] of Object.entries(doc.paths)) {
    const params = [...template.matchAll(/\{([^}]+)\}/g)].map((m) => m[1]!);
    const pattern = new RegExp(`^${template.replace(/\{[^}]+\}/g, "([^/]+)")}$`);
    for (const [method, op] of Object.entries(methods)) {
      const bodyParam = (op.parameters ?? []).find((p) => p.in === "body");
      const responses = new Map<string, ValidateFunction | undefined>();
      for (const [status, r] of Object.entries(op.responses ?? {})) {
        responses.set(
          status,
          r.schema ? ajv.compile(toDraft04(r.schema, "firecracker.json") as object) : undefined,
        );
      }
      ops.push({
        method: method.toUpperCase(),
        template,
        pattern,
        params,
        ...(bodyParam
          ? {
              body: {
                required: bodyParam.required === true,
                validate: ajv.compile(toDraft04(bodyParam.schema as Json, "firecracker.json") as object),
              },
            }
          : {}),
        responses,
      });
    }
  }

  const find = (method: string, p: string) => {
    const pathOnly = p.split("?")[0]!;
    for (const op of ops) {
      if (op.method !== method) continue;
      const m = op.pattern.exec(pathOnly);
      if (m) return { op, values: m.slice(1).map((v) => decodeURIComponent(v)) };
    }
    return undefined;
  };

  return {
    version: doc.info.version,
    operationOf(req) {
      const f = find(req.method, req.path);
      return f ? `${f.op.method} ${f.op.template}` : undefined;
    },
    checkRequest(req) {
      const f = find(req.method, req.path);
      if (!f) {
        const pathKnown = ops.some((o) => o.pattern.test(req.path));
        return [
          `${req.method} ${req.path}: ${pathKnown ? "method not defined for this path" : "no such path"} in the API`,
        ];
      }
      const { op, values } = f;
      const errors: string[] = [];
      if (!op.body) {
        if (req.body !== undefined) errors.push(`${req.method} ${op.template} takes no body`);
        return errors;
      }
      if (req.body === undefined) {
        if (op.body.required) errors.push(`${req.method} ${op.template} requires a body`);
        return errors;
      }
      if (!op.body.validate(req.body)) {
        for (const e of op.body.validate.errors ?? []) {
          errors.push(
            `${req.method} ${op.template} body${e.instancePath} ${e.message ?? "is invalid"} ${JSON.stringify(e.params)}`,
          );
        }
      }
      // Firecracker refuses a body whose id differs from the path's ("drive_id", "iface_id", "id").
      op.params.forEach((name, i) => {
        const inBody = (req.body as Record<string, unknown>)[name];
        if (inBody !== undefined && inBody !== values[i]) {
          errors.push(
            `${req.method} ${op.template}: body ${name} ${JSON.stringify(inBody)} differs from the path's ${JSON.stringify(values[i])}`,
          );
        }
      });
      return errors;
    },
    checkResponse(method, p, status, body) {
      const f = find(method, p);
      if (!f) return [`${method} ${p}: no such operation`];
      const key = f.op.responses.has(String(status)) ? String(status) : "default";
      if (!f.op.responses.has(key))
        return [`${method} ${f.op.template}: status ${status} not in the definition`];
      const validate = f.op.responses.get(key);
      if (!validate) return body === undefined ? [] : [`${method} ${f.op.template} ${status} has no body`];
      return validate(body)
        ? []
        : (validate.errors ?? []).map((e) => `response${e.instancePath} ${e.message}`);
    },
  };
}

export interface FakeFirecracker {
  requests: RecordedRequest[];
  /** What GET / reports. */
  state: "Not started" | "Running" | "Paused";
  /** Responses of the fake itself that the definition does not allow (a test asserts none). */
  ownViolations: string[];
  close(): Promise<void>;
}

/**
 * A stand-in for Firecracker's API server: records requests, answers 204 (400 with a
 * fault_message when the request does not conform to the definition, as Firecracker would),
 * reports its state on GET /, and calls `onCtrlAltDel` when the guest is asked to stop (the test
 * then ends the stand-in VMM process, as a real guest powering off ends Firecracker).
 */
export async function startFakeFirecracker(
  socketPath: string,
  validator: FirecrackerSpecValidator,
  hooks: { onCtrlAltDel?: () => void; instanceId?: string } = {},
): Promise<FakeFirecracker> {
  fs.mkdirSync(path.dirname(socketPath), { recursive: true });
  const fake: FakeFirecracker = {
    requests: [],
    state: "Not started",
    ownViolations: [],
    close: async () => {},
  };
  let machineConfig: unknown = { vcpu_count: 1, mem_size_mib: 128, smt: false };
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (d: Buffer) => chunks.push(d));
    req.on("end", () => {
      const text = Buffer.concat(chunks).toString("utf8");
      let body: unknown;
      try {
        body = text ? JSON.parse(text) : undefined;
      } catch {
        body = text;
      }
      const rec = { method: req.method ?? "GET", path: req.url ?? "/", body };
      fake.requests.push(rec);
      const problems = validator.checkRequest(rec);
      const reply = (status: number, json?: unknown) => {
        const errs = validator.checkResponse(rec.method, rec.path, status, json);
        if (errs.length > 0)
          fake.ownViolations.push(`${rec.method} ${rec.path} → ${status}: ${errs.join("; ")}`);
        if (json === undefined) res.writeHead(status).end();
        else res.writeHead(status, { "content-type": "application/json" }).end(JSON.stringify(json));
      };
      if (problems.length > 0) return reply(400, { fault_message: problems.join("; ") });
      if (rec.method === "GET" && rec.path === "/") {
        return reply(200, {
          app_name: "Firecracker",
          id: hooks.instanceId ?? "fake",
          state: fake.state,
          vmm_version: validator.version,
        });
      }
      if (rec.method === "GET" && rec.path === "/version")
        return reply(200, { firecracker_version: validator.version });
      if (rec.method === "GET" && rec.path === "/machine-config") return reply(200, machineConfig);
      if (rec.method === "GET" && rec.path === "/vm/config")
        return reply(200, { "machine-config": machineConfig });
      if (rec.method === "PUT" && rec.path === "/machine-config" && fake.state === "Not started")
        machineConfig = body;
      if (rec.method === "PUT" && rec.path === "/actions") {
        const action = (body as { action_type: string }).action_type;
        if (action === "InstanceStart") {
          if (fake.state !== "Not started")
            return reply(400, { fault_message: "The microVM is already running." });
          fake.state = "Running";
        }
        reply(204);
        if (action === "SendCtrlAltDel") setTimeout(() => hooks.onCtrlAltDel?.(), 50);
        return;
      }
      if (rec.method === "PATCH" && rec.path === "/vm") {
        if (fake.state === "Not started")
          return reply(400, { fault_message: "The microVM has not been started." });
        fake.state = (body as { state: string }).state === "Paused" ? "Paused" : "Running";
        return reply(204);
      }
      if (rec.method === "PUT" && fake.state !== "Not started" && !rec.path.startsWith("/actions")) {
        return reply(400, { fault_message: `${rec.path} is a pre-boot resource; the microVM is running` });
      }
      reply(204);
    });
  });
  // Bound like Firecracker binds it, whatever the length of the path the backend will use.
  await withSocketPath(
    socketPath,
    (reachable) =>
      new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(reachable, () => resolve());
      }),
  );
  fake.close = () =>
    new Promise<void>((resolve) => {
      server.closeAllConnections();
      server.close(() => resolve());
    });
  return fake;
}
