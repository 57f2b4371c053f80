export { assetmanagerd } from "./definition.js";
// The host kernel and its initramfs, for `kiln assets import-kernel`.
export { findHostKernel, type HostKernel } from "./kernel/host-kernel.js";
export { buildInitramfs } from "./kernel/initramfs.js";
