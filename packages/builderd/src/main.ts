#!/usr/bin/env node
// Standalone builderd: `builderd` or `kiln serve builderd`.
import { runStandalone } from "@kiln/kit";
import { builderd } from "./definition.js";

await runStandalone(builderd);
