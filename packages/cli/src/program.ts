import { Command } from "commander";
import { configCommand } from "./commands/config.js";
import { migrateCommand } from "./commands/migrate.js";
import { serveCommand } from "./commands/serve.js";
import { statusCommand } from "./commands/status.js";
import { upCommand } from "./commands/up.js";

export function createProgram(): Command {
  return new Command("kiln")
    .description("Kiln: container images → microVM root filesystems → isolated, metered VMs")
    .version("0.1.0")
    .showHelpAfterError()
    .addCommand(upCommand())
    .addCommand(serveCommand())
    .addCommand(statusCommand())
    .addCommand(migrateCommand())
    .addCommand(configCommand());
}
