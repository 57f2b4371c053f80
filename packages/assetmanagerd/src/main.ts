#!/usr/bin/env node
// Standalone assetmanagerd: `assetmanagerd` or `kiln serve assetmanagerd`.
import { runStandalone } from "@kiln/kit";
import { assetmanagerd } from "./definition.js";

await runStandalone(assetmanagerd);
