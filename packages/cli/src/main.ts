#!/usr/bin/env node
import { ConfigError } from "@kiln/kit";
import { describeError } from "./errors.js";
import { createProgram } from "./program.js";

try {
  await createProgram().parseAsync(process.argv);
} catch (err) {
  process.stderr.write(`kiln: ${describeError(err)}\n`);
  process.exit(err instanceof ConfigError ? 2 : 1);
}
