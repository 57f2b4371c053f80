#!/usr/bin/env node
// Standalone metald: `metald` or `kiln serve metald`.
import { runStandalone } from "@kiln/kit";
import { metald } from "./definition.js";

await runStandalone(metald);
