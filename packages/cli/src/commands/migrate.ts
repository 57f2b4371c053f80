import { migrateService } from "@kiln/kit";
import { Command } from "commander";
import { printRows } from "../output.js";
import { SERVICES, serviceByName } from "../services.js";

export function migrateCommand(): Command {
  return new Command("migrate")
    .description("apply database migrations and exit (services also migrate at start)")
    .argument("[services...]", "services to migrate (default: all)")
    .option("--json", "print the result as JSON")
    .action(async (names: string[], opts: { json?: boolean }) => {
      const defs = names.length > 0 ? names.map(serviceByName) : SERVICES;
      const rows = [];
      for (const def of defs) {
        const { location, applied } = await migrateService(def, {});
        rows.push({ service: def.name, database: location, applied });
      }
      printRows(
        rows.map((r) =>
          opts.json ? r : { ...r, applied: r.applied.length ? r.applied.join(", ") : "(up to date)" },
        ),
        {
          json: opts.json,
          columns: [
            { key: "service", header: "SERVICE" },
            { key: "database", header: "DATABASE" },
            { key: "applied", header: "APPLIED" },
          ],
        },
      );
    });
}
