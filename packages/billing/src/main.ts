#!/usr/bin/env node
// Standalone billing: `kiln-billing` or `kiln serve billing`.
import { runStandalone } from "@kiln/kit";
import { billing } from "./definition.js";

await runStandalone(billing);
