import type { TenantContext, Tier } from "./tenant.js";

/**
 * A tenant's effective resource limits (kiln.common.v1.TenantLimits with every field set).
 * 0 on a numeric limit means "no limit"; `["*"]` as a host list means any host.
 */
export interface TenantLimits {
  maxConcurrentBuilds: number;
  maxDailyBuilds: number;
  maxMemoryBytes: number;
  maxCpuCores: number;
  /** Disk one build may use, including the decompressed image (bounds decompression bombs). */
  maxDiskBytes: number;
  maxStorageBytes: number;
  timeoutSeconds: number;
  /** Registries (host[:port]) builds may pull from. */
  allowedRegistries: string[];
  allowedGitHosts: string[];
  allowExternalNetwork: boolean;
  maxVms: number;
  maxVcpusPerVm: number;
  maxMemoryBytesPerVm: number;
  /** Whether VMs may open outbound connections (metadata addresses stay blocked regardless). */
  egressAllowed: boolean;
}

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

/** Public registries the FREE tier may pull from (plus registries the operator trusts). */
export const PUBLIC_REGISTRIES = [
  "docker.io",
  "registry-1.docker.io",
  "ghcr.io",
  "quay.io",
  "gcr.io",
  "registry.k8s.io",
  "public.ecr.aws",
];

/** The seeds' tiers. Operators override per tenant through gatewayd. */
export const TIER_LIMITS: Readonly<Record<Tier, Readonly<TenantLimits>>> = {
  free: {
    maxConcurrentBuilds: 1,
    maxDailyBuilds: 20,
    maxMemoryBytes: 1 * GiB,
    maxCpuCores: 1,
    maxDiskBytes: 2 * GiB,
    maxStorageBytes: 5 * GiB,
    timeoutSeconds: 600,
    allowedRegistries: PUBLIC_REGISTRIES,
    allowedGitHosts: ["github.com", "gitlab.com"],
    allowExternalNetwork: false,
    maxVms: 2,
    maxVcpusPerVm: 1,
    maxMemoryBytesPerVm: 512 * MiB,
    egressAllowed: false,
  },
  pro: {
    maxConcurrentBuilds: 4,
    maxDailyBuilds: 500,
    maxMemoryBytes: 4 * GiB,
    maxCpuCores: 2,
    maxDiskBytes: 20 * GiB,
    maxStorageBytes: 100 * GiB,
    timeoutSeconds: 1800,
    allowedRegistries: ["*"],
    allowedGitHosts: ["*"],
    allowExternalNetwork: true,
    maxVms: 20,
    maxVcpusPerVm: 4,
    maxMemoryBytesPerVm: 8 * GiB,
    egressAllowed: true,
  },
  enterprise: {
    maxConcurrentBuilds: 16,
    maxDailyBuilds: 5000,
    maxMemoryBytes: 16 * GiB,
    maxCpuCores: 8,
    maxDiskBytes: 100 * GiB,
    maxStorageBytes: 1024 * GiB,
    timeoutSeconds: 3600,
    allowedRegistries: ["*"],
    allowedGitHosts: ["*"],
    allowExternalNetwork: true,
    maxVms: 200,
    maxVcpusPerVm: 16,
    maxMemoryBytesPerVm: 32 * GiB,
    egressAllowed: true,
  },
  dedicated: {
    maxConcurrentBuilds: 0,
    maxDailyBuilds: 0,
    maxMemoryBytes: 0,
    maxCpuCores: 0,
    maxDiskBytes: 0,
    maxStorageBytes: 0,
    timeoutSeconds: 7200,
    allowedRegistries: ["*"],
    allowedGitHosts: ["*"],
    allowExternalNetwork: true,
    maxVms: 0,
    maxVcpusPerVm: 64,
    maxMemoryBytesPerVm: 0,
    egressAllowed: true,
  },
};

/** Where a service gets a tenant's effective limits (gatewayd's per-tenant overrides, later). */
export type LimitsResolver = (tenant: TenantContext) => Promise<TenantLimits>;

/** The tier defaults, optionally adjusted (e.g. tests lowering a limit). */
export function tierLimits(adjust?: (tier: Tier, limits: TenantLimits) => TenantLimits): LimitsResolver {
  return async (tenant) => {
    const base = {
      ...TIER_LIMITS[tenant.tier],
      allowedRegistries: [...TIER_LIMITS[tenant.tier].allowedRegistries],
    };
    return adjust ? adjust(tenant.tier, base) : base;
  };
}
