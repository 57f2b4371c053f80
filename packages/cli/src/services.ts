import { assetmanagerd } from "@kiln/assetmanagerd";
import { billaged } from "@kiln/billaged";
import { billing } from "@kiln/billing";
import { builderd } from "@kiln/builderd";
import { gatewayd } from "@kiln/gatewayd";
import type { ServiceDefinition, ServiceName } from "@kiln/kit";
import { metald } from "@kiln/metald";

/** Every service, in start order: what others call starts first, the edge (gatewayd) last. */
export const SERVICES: readonly ServiceDefinition[] = [
  billing,
  billaged,
  assetmanagerd,
  builderd,
  metald,
  gatewayd,
] as ServiceDefinition[];

export function serviceByName(name: string): ServiceDefinition {
  const def = SERVICES.find((s) => s.name === name);
  if (!def) {
    throw new Error(
      `unknown service ${JSON.stringify(name)}: expected one of ${SERVICES.map((s) => s.name).join(", ")}`,
    );
  }
  return def;
}

export type { ServiceName };
