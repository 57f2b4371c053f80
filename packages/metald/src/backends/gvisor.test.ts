import { backendConformanceSuite } from "./backend.suite.js";
import { createGvisorBackend } from "./gvisor.js";

backendConformanceSuite({
  label: "gvisor",
  backend: () => createGvisorBackend(),
  network: "address",
  vm: false,
  bootTimeoutMs: 20_000,
  shutdownTimeoutMs: 5_000,
});
