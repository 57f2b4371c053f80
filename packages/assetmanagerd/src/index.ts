// Clients: UploadAsset of a file without per-chunk copies (the CLI's and the bench's uploads).
export {
  DEFAULT_CHUNK_BYTES,
  type UploadEndpoint,
  type UploadFileOptions,
  uploadAssetFile,
} from "./client/upload-file.js";
export { assetmanagerd } from "./definition.js";
// The host kernel and its initramfs, for `kiln assets import-kernel`.
export { findHostKernel, type HostKernel } from "./kernel/host-kernel.js";
export { buildInitramfs } from "./kernel/initramfs.js";
