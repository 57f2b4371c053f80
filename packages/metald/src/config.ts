import type { ConfigSpec } from "@kiln/kit";

/** metald's own settings (`UNKEY_METALD_*`), next to the common ones every service has. */
export const settings = {} satisfies ConfigSpec;
