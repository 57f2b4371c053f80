import { type ConfigSpec, duration, int, list, oneOf, str, url } from "@kiln/kit";

const GiB = 1024 ** 3;

/** assetmanagerd's own settings (`UNKEY_ASSETMANAGERD_*`), next to the common ones every service has. */
export const settings = {
  storageBackend: oneOf(["local", "s3"] as const, {
    default: "local",
    doc: "Where blobs live: local (content-addressed files under <data dir>/assets/sha256/) or s3 (objects <prefix>sha256/ab/<digest> in S3_BUCKET).",
  }),
  s3Endpoint: url({
    default: "",
    schemes: ["http", "https"],
    doc: "S3 endpoint for storageBackend=s3 (MinIO, Ceph, s3rver, …), addressed path-style. Empty: AWS's endpoint for S3_REGION.",
  }),
  s3Bucket: str({
    default: "",
    pattern: /^$|^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/,
    form: "an S3 bucket name",
    doc: "Bucket holding the blobs (must exist); required when storageBackend=s3.",
  }),
  s3Region: str({ default: "us-east-1", doc: "S3 region." }),
  s3AccessKeyId: str({
    default: "",
    doc: "S3 access key id. Empty: the AWS SDK's default credential chain (AWS_* variables, ~/.aws, instance roles).",
  }),
  s3SecretAccessKey: str({ default: "", secret: true, doc: "S3 secret access key (with S3_ACCESS_KEY_ID)." }),
  s3Prefix: str({
    default: "",
    pattern: /^$|^[A-Za-z0-9._-]+(\/[A-Za-z0-9._-]+)*\/$/,
    form: "empty or a key prefix ending in '/' (e.g. kiln/assets/)",
    doc: "Key prefix for everything assetmanagerd writes to the bucket.",
  }),
  s3PartSize: int({
    default: 16 * 1024 ** 2,
    min: 5 * 1024 ** 2,
    max: 5 * GiB,
    doc: "Part size in bytes of S3 multipart uploads (at least 5 MiB, S3's minimum). Up to 4 parts are in flight per upload.",
  }),
  vmRoot: str({
    default: "",
    form: "an absolute directory or empty",
    pattern: /^$|^\//,
    doc: "Directory PrepareAssets places assets under (<vm root>/<target_path>). Empty: <data dir>/vms. Put it on the data dir's filesystem so assets are hard-linked, not copied.",
  }),
  importDirs: list({
    default: [],
    item: /^\//,
    form: "a comma-separated list of absolute directories",
    doc: "Directories RegisterAsset may import host files from (internal callers only). Empty: <data dir>/tenants, where builderd writes its builds.",
  }),
  maxUploadSize: int({
    default: 32 * GiB,
    min: 1,
    doc: "Largest asset in bytes UploadAsset and RegisterAsset accept; larger ones fail with resource_exhausted. Tenants are also held to their tier's storage quota.",
  }),
  leaseDefaultTtl: duration({
    default: 0,
    doc: "TTL given to leases acquired without ttl_seconds. 0s: such leases never expire (the contract's default).",
  }),
  gcRetention: duration({
    default: 7 * 24 * 3_600_000,
    doc: "GarbageCollect with delete_unreferenced deletes assets without active leases not used (acquired, released, prepared) for this long, unless the request gives max_age_seconds.",
  }),
  gcInterval: duration({
    default: 3_600_000,
    doc: "How often the background collector releases expired leases and removes unreferenced blobs and upload leftovers (it never deletes assets). 0s: only at start-up and on GarbageCollect.",
  }),
} satisfies ConfigSpec;
