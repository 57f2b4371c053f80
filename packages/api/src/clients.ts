// Typed Connect clients for every Kiln service, plus the service table and seed ports.
// A transport decides where calls go: `createConnectTransport` / `createGrpcTransport` from
// @connectrpc/connect-node for remote services, `createRouterTransport` for in-process wiring.
import { type Client, createClient, type Transport } from "@connectrpc/connect";
import { AssetManagerService } from "./gen/kiln/assetmanagerd/v1/assetmanagerd_pb.js";
import { BillingService } from "./gen/kiln/billaged/v1/billaged_pb.js";
import { UsageService } from "./gen/kiln/billing/v1/billing_pb.js";
import { BuilderService } from "./gen/kiln/builderd/v1/builderd_pb.js";
import { ApiKeyService, AppService, TenantService } from "./gen/kiln/gatewayd/v1/gatewayd_pb.js";
import { VmService } from "./gen/kiln/metald/v1/metald_pb.js";

export type BuilderClient = Client<typeof BuilderService>;
export type AssetManagerClient = Client<typeof AssetManagerService>;
export type VmClient = Client<typeof VmService>;
export type BillagedClient = Client<typeof BillingService>;
export type UsageClient = Client<typeof UsageService>;
export type TenantClient = Client<typeof TenantService>;
export type ApiKeyClient = Client<typeof ApiKeyService>;
export type AppClient = Client<typeof AppService>;

/** builderd: builds (kiln.builderd.v1.BuilderService). */
export function createBuilderClient(transport: Transport): BuilderClient {
  return createClient(BuilderService, transport);
}

/** assetmanagerd: assets, leases, GC, prepare (kiln.assetmanagerd.v1.AssetManagerService). */
export function createAssetManagerClient(transport: Transport): AssetManagerClient {
  return createClient(AssetManagerService, transport);
}

/** metald: VMs and deployments of one host (kiln.metald.v1.VmService). */
export function createVmClient(transport: Transport): VmClient {
  return createClient(VmService, transport);
}

/** billaged: usage samples and VM lifecycle notices (kiln.billaged.v1.BillingService). */
export function createBillagedClient(transport: Transport): BillagedClient {
  return createClient(BillingService, transport);
}

/** billing aggregator: usage queries, invoices, prices (kiln.billing.v1.UsageService). */
export function createUsageClient(transport: Transport): UsageClient {
  return createClient(UsageService, transport);
}

/** gatewayd: operator tenant administration (kiln.gatewayd.v1.TenantService). */
export function createTenantClient(transport: Transport): TenantClient {
  return createClient(TenantService, transport);
}

/** gatewayd: the caller's API keys (kiln.gatewayd.v1.ApiKeyService). */
export function createApiKeyClient(transport: Transport): ApiKeyClient {
  return createClient(ApiKeyService, transport);
}

/** gatewayd: apps and deployments (kiln.gatewayd.v1.AppService). */
export function createAppClient(transport: Transport): AppClient {
  return createClient(AppService, transport);
}

/** The Connect services each Kiln process serves. */
export const services = {
  gatewayd: [TenantService, ApiKeyService, AppService],
  builderd: [BuilderService],
  assetmanagerd: [AssetManagerService],
  metald: [VmService],
  billaged: [BillingService],
  billing: [UsageService],
} as const;

/** A Kiln service process. */
export type ServiceName = keyof typeof services;

/** Default API port of each service (the seeds'; overridable with UNKEY_<SERVICE>_PORT). */
export const SERVICE_PORTS = {
  gatewayd: 8000,
  metald: 8080,
  billaged: 8081,
  builderd: 8082,
  assetmanagerd: 8083,
  billing: 8084,
} as const satisfies Record<ServiceName, number>;
