import {
  AlreadyExistsError,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  ResourceExhaustedError,
} from "@kiln/kit";

/** Another tenant's asset answers the same as a missing one, so existence does not leak. */
export class AssetNotFoundError extends NotFoundError {
  constructor(
    readonly assetId: string,
    readonly tenantId: string,
  ) {
    super(`asset ${assetId} not found`);
  }
}

export class AssetIdTakenError extends AlreadyExistsError {
  constructor(readonly assetId: string) {
    super(`asset id ${assetId} is taken: suggest another id or leave it empty for a generated one`);
  }
}

export class LeaseIdTakenError extends AlreadyExistsError {
  constructor(readonly leaseId: string) {
    super(
      `lease id ${leaseId} is taken by another lease: choose a new id, or leave it empty for a generated one`,
    );
  }
}

export class AssetNotAvailableError extends FailedPreconditionError {
  constructor(
    readonly assetId: string,
    readonly status: string,
  ) {
    super(`asset ${assetId} is ${status}, not AVAILABLE: wait for its upload to finish or use another asset`);
  }
}

export class AssetLeasedError extends FailedPreconditionError {
  constructor(
    readonly assetId: string,
    readonly holders: string[],
  ) {
    super(
      `asset ${assetId} has ${holders.length} active lease(s) (held by ${holders.slice(0, 5).join(", ")}${
        holders.length > 5 ? ", …" : ""
      }): release them first, or delete with force to end them`,
    );
  }
}

/** A name, label, location or target path that would reach outside where it belongs. */
export class UnsafePathError extends InvalidArgumentError {
  constructor(field: string, value: string, why: string) {
    super(`${field} ${JSON.stringify(value)} ${why}`, { field });
  }
}

export class UploadTooLargeError extends ResourceExhaustedError {
  constructor(
    readonly limitBytes: number,
    what: string,
  ) {
    super(`${what} exceeds the ${limitBytes}-byte limit; nothing was stored`);
  }
}

export class StorageQuotaError extends ResourceExhaustedError {
  constructor(
    readonly tenantId: string,
    readonly quotaBytes: number,
    readonly usedBytes: number,
  ) {
    super(
      `tenant ${tenantId} storage quota (${quotaBytes} bytes; ${usedBytes} used) reached: delete assets or run GarbageCollect; nothing was stored`,
    );
  }
}
