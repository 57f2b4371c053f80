import { Command } from "commander";
import { assetsCommand } from "./commands/assets.js";
import { buildCommand } from "./commands/build.js";
import { buildsCommand } from "./commands/builds.js";
import { configCommand } from "./commands/config.js";
import { migrateCommand } from "./commands/migrate.js";
import { runCommand } from "./commands/run.js";
import { serveCommand } from "./commands/serve.js";
import { statusCommand } from "./commands/status.js";
import { upCommand } from "./commands/up.js";
import { vmsCommand } from "./commands/vms.js";

export function createProgram(): Command {
  return new Command("kiln")
    .description("Kiln: container images → microVM root filesystems → isolated, metered VMs")
    .version("0.1.0")
    .showHelpAfterError()
    .option("--tenant <id>", 'tenant to act for (default: $KILN_TENANT or "default")')
    .option(
      "--tier <tier>",
      "the tenant's tier when acting as operator: free, pro, enterprise, dedicated (default: $KILN_TIER or pro)",
    )
    .option(
      "--data-dir <dir>",
      "Kiln's data directory, where the service token lives (default: $KILN_DATA_DIR, /var/lib/kiln as root, ~/.kiln)",
    )
    .addCommand(upCommand())
    .addCommand(buildCommand())
    .addCommand(buildsCommand())
    .addCommand(runCommand())
    .addCommand(vmsCommand())
    .addCommand(serveCommand())
    .addCommand(statusCommand())
    .addCommand(assetsCommand())
    .addCommand(migrateCommand())
    .addCommand(configCommand());
}
