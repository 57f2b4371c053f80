import { runStandalone } from "@kiln/kit";
import { Command } from "commander";
import { SERVICES, serviceByName } from "../services.js";

export function serveCommand(): Command {
  return new Command("serve")
    .description(`run one service as its own process (${SERVICES.map((s) => s.name).join(", ")})`)
    .argument("<service>", "service name")
    .action(async (name: string) => {
      await runStandalone(serviceByName(name));
    });
}
