import type { ConfigSpec } from "@kiln/kit";

/** assetmanagerd's own settings (`UNKEY_ASSETMANAGERD_*`), next to the common ones every service has. */
export const settings = {} satisfies ConfigSpec;
