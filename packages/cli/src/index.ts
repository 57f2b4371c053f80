export { type PlatformOptions, startPlatform } from "./platform.js";
export { createProgram } from "./program.js";
export { SERVICES, serviceByName } from "./services.js";
