import path from "node:path";
import { resolveDataDir, runUntilSignal } from "@kiln/kit";
import { Command } from "commander";
import { pino } from "pino";
import { printJson, printRows } from "../output.js";
import { startPlatform } from "../platform.js";

export function upCommand(): Command {
  return new Command("up")
    .description("run all six services in this process on embedded defaults (SQLite, local storage)")
    .option("--logs <where>", "where service logs go: file (<data dir>/logs/kiln.log) or stdout", "file")
    .option("--json", "print where services listen as JSON")
    .action(async function (this: Command) {
      // --data-dir is the program's global option (shared with the commands that call services).
      const opts = this.optsWithGlobals() as { dataDir?: string; logs: string; json?: boolean };
      if (opts.logs !== "file" && opts.logs !== "stdout") {
        throw new Error(`--logs: expected file or stdout, got ${JSON.stringify(opts.logs)}`);
      }
      const dataDir = resolveDataDir(opts.dataDir ?? "");
      const logFile = path.join(dataDir, "logs", "kiln.log");
      const logDestination =
        opts.logs === "file" ? pino.destination({ dest: logFile, mkdir: true, sync: false }) : undefined;
      await runUntilSignal(async () => {
        const services = await startPlatform({ dataDir, logDestination });
        const rows = services.map((s) => ({
          service: s.name,
          api: `http://${s.api.host}:${s.api.port}`,
          metrics: `http://${s.metricsEndpoint.host}:${s.metricsEndpoint.port}/metrics`,
          health: `http://${s.api.host}:${s.api.port}/health`,
        }));
        const logs = opts.logs === "file" ? logFile : "stdout";
        if (opts.json) {
          printJson({ dataDir, logs, services: rows });
        } else {
          printRows(rows, {
            columns: [
              { key: "service", header: "SERVICE" },
              { key: "api", header: "API (Connect, gRPC, gRPC-Web)" },
              { key: "metrics", header: "METRICS" },
            ],
          });
          process.stdout.write(`data: ${dataDir}\nlogs: ${logs}\nKiln is up. Ctrl-C stops it.\n`);
        }
        return services;
      });
    });
}
