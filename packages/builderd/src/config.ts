import type { ConfigSpec } from "@kiln/kit";

/** builderd's own settings (`UNKEY_BUILDERD_*`), next to the common ones every service has. */
export const settings = {} satisfies ConfigSpec;
