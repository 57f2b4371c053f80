import type { ConfigSpec } from "@kiln/kit";

/** billing's own settings (`UNKEY_BILLING_*`), next to the common ones every service has. */
export const settings = {} satisfies ConfigSpec;
