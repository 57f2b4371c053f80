import { configReference, describeConfig, loadConfig, serviceSettings } from "@kiln/kit";
import { Command } from "commander";
import { printRows } from "../output.js";
import { SERVICES, serviceByName } from "../services.js";

export function configCommand(): Command {
  return new Command("config")
    .description("show the effective configuration of services (from UNKEY_* variables and defaults)")
    .argument("[services...]", "services to show (default: all)")
    .option("--json", "print as JSON")
    .option("--reference", "print the Markdown configuration reference (docs/configuration.md)")
    .action((names: string[], opts: { json?: boolean; reference?: boolean }) => {
      const defs = names.length > 0 ? names.map(serviceByName) : SERVICES;
      if (opts.reference) {
        process.stdout.write(configReference(defs));
        return;
      }
      const rows = defs.flatMap((def) => {
        const spec = serviceSettings(def);
        return describeConfig(def.name, spec, loadConfig(def.name, spec)).map((r) => ({
          service: def.name,
          ...r,
          source: r.default ? "default" : "environment",
        }));
      });
      printRows(opts.json ? rows.map(({ source: _s, ...r }) => r) : rows, {
        json: opts.json,
        columns: [
          { key: "name", header: "VARIABLE" },
          { key: "value", header: "VALUE" },
          { key: "source", header: "SOURCE" },
        ],
      });
    });
}
