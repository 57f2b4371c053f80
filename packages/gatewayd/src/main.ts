#!/usr/bin/env node
// Standalone gatewayd: `gatewayd` or `kiln serve gatewayd`.
import { runStandalone } from "@kiln/kit";
import { gatewayd } from "./definition.js";

await runStandalone(gatewayd);
