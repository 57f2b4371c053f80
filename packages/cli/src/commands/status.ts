import { loadConfig, serviceSettings } from "@kiln/kit";
import { Command } from "commander";
import { printRows } from "../output.js";
import { SERVICES } from "../services.js";

type Status = {
  service: string;
  url: string;
  live: boolean;
  ready: boolean;
  detail: string;
};

/** Asks each service's /health/ready where the UNKEY_<SVC>_HOST/PORT settings say it listens. */
export async function platformStatus(
  env: Record<string, string | undefined> = process.env,
): Promise<Status[]> {
  return Promise.all(
    SERVICES.map(async (def) => {
      const config = loadConfig(def.name, serviceSettings(def), env) as { host: string; port: number };
      const host = config.host === "0.0.0.0" ? "127.0.0.1" : config.host;
      const url = `http://${host}:${config.port}`;
      try {
        const res = await fetch(`${url}/health/ready`, { signal: AbortSignal.timeout(3_000) });
        const body = (await res.json()) as { checks?: Record<string, { ok: boolean; error?: string }> };
        const failing = Object.entries(body.checks ?? {})
          .filter(([, c]) => !c.ok)
          .map(([name, c]) => `${name}: ${c.error ?? "failing"}`);
        return { service: def.name, url, live: true, ready: res.ok, detail: failing.join("; ") };
      } catch (err) {
        const reason = (err as { cause?: { code?: string } }).cause?.code ?? (err as Error).message;
        return { service: def.name, url, live: false, ready: false, detail: `not reachable (${reason})` };
      }
    }),
  );
}

export function statusCommand(): Command {
  return new Command("status")
    .description("show whether each service is up and ready")
    .option("--json", "print as JSON")
    .action(async (opts: { json?: boolean }) => {
      const rows = await platformStatus();
      printRows(
        opts.json
          ? rows
          : rows.map((r) => ({ ...r, live: r.live ? "yes" : "no", ready: r.ready ? "yes" : "no" })),
        {
          json: opts.json,
          columns: [
            { key: "service", header: "SERVICE" },
            { key: "url", header: "URL" },
            { key: "live", header: "LIVE" },
            { key: "ready", header: "READY" },
            { key: "detail", header: "DETAIL" },
          ],
        },
      );
      if (rows.some((r) => !r.ready)) process.exitCode = 1;
    });
}
