// @kiln/api: the generated protobuf contracts of every Kiln service, typed clients, and the
// service/port table. Messages live in one namespace per proto package (names such as
// GetDeploymentRequest exist in both metald and gatewayd); service descriptors are also
// exported flat because their names are unique.
//
//   import { builderd, BuilderService, createBuilderClient } from "@kiln/api";
//   const req = create(builderd.CreateBuildRequestSchema, { … });
import { file_kiln_assetmanagerd_v1_assetmanagerd } from "./gen/kiln/assetmanagerd/v1/assetmanagerd_pb.js";
import { file_kiln_billaged_v1_billaged } from "./gen/kiln/billaged/v1/billaged_pb.js";
import { file_kiln_billing_v1_billing } from "./gen/kiln/billing/v1/billing_pb.js";
import { file_kiln_builderd_v1_builderd } from "./gen/kiln/builderd/v1/builderd_pb.js";
import { file_kiln_common_v1_common } from "./gen/kiln/common/v1/common_pb.js";
import { file_kiln_gatewayd_v1_gatewayd } from "./gen/kiln/gatewayd/v1/gatewayd_pb.js";
import { file_kiln_metald_v1_metald } from "./gen/kiln/metald/v1/metald_pb.js";
import { file_kiln_validate_v1_validate } from "./gen/kiln/validate/v1/validate_pb.js";

export * from "./clients.js";
export * as assetmanagerd from "./gen/kiln/assetmanagerd/v1/assetmanagerd_pb.js";
export { AssetManagerService } from "./gen/kiln/assetmanagerd/v1/assetmanagerd_pb.js";
export * as billaged from "./gen/kiln/billaged/v1/billaged_pb.js";
export { BillingService } from "./gen/kiln/billaged/v1/billaged_pb.js";
export * as billing from "./gen/kiln/billing/v1/billing_pb.js";
export { UsageService } from "./gen/kiln/billing/v1/billing_pb.js";
export * as builderd from "./gen/kiln/builderd/v1/builderd_pb.js";
export { BuilderService } from "./gen/kiln/builderd/v1/builderd_pb.js";
export * as common from "./gen/kiln/common/v1/common_pb.js";
export * as gatewayd from "./gen/kiln/gatewayd/v1/gatewayd_pb.js";
export { ApiKeyService, AppService, TenantService } from "./gen/kiln/gatewayd/v1/gatewayd_pb.js";
export * as metald from "./gen/kiln/metald/v1/metald_pb.js";
export { VmService } from "./gen/kiln/metald/v1/metald_pb.js";
/** Validation options: the `field` / `oneof` extensions, FieldRules, OneofRules, Format. */
export * as validate from "./gen/kiln/validate/v1/validate_pb.js";

/** Every Kiln proto file, e.g. for `createRegistry(...protoFiles)` (JSON of Any, reflection). */
export const protoFiles = [
  file_kiln_common_v1_common,
  file_kiln_validate_v1_validate,
  file_kiln_builderd_v1_builderd,
  file_kiln_assetmanagerd_v1_assetmanagerd,
  file_kiln_metald_v1_metald,
  file_kiln_billaged_v1_billaged,
  file_kiln_billing_v1_billing,
  file_kiln_gatewayd_v1_gatewayd,
] as const;
