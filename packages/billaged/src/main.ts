#!/usr/bin/env node
// Standalone billaged: `billaged` or `kiln serve billaged`.
import { runStandalone } from "@kiln/kit";
import { billaged } from "./definition.js";

await runStandalone(billaged);
