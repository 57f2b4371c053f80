import type { ConfigSpec } from "@kiln/kit";

/** gatewayd's own settings (`UNKEY_GATEWAYD_*`), next to the common ones every service has. */
export const settings = {} satisfies ConfigSpec;
