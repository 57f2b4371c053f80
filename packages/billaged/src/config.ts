import type { ConfigSpec } from "@kiln/kit";

/** billaged's own settings (`UNKEY_BILLAGED_*`), next to the common ones every service has. */
export const settings = {} satisfies ConfigSpec;
