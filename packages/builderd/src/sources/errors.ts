import { FailedPreconditionError, NotFoundError, PermissionDeniedError } from "@kiln/kit";

/**
 * Errors of image sources. Each names what it is about (digest, registry, path, platform) and,
 * where the operator or the user can change something, what to change.
 */

/** Bytes that do not match the digest (or size) that names them: corruption or tampering. */
export class DigestMismatchError extends FailedPreconditionError {
  constructor(
    /** What was being verified, e.g. "layer", "manifest", "config". */
    readonly what: string,
    readonly expected: string,
    readonly actual: string,
    detail?: string,
  ) {
    super(
      `${what} digest mismatch: expected ${expected}, got ${actual}${detail ? ` (${detail})` : ""}; the source served corrupt or tampered content`,
    );
  }
}

/** The tenant's tier does not allow pulling from this registry. */
export class RegistryNotAllowedError extends PermissionDeniedError {
  constructor(
    readonly registry: string,
    readonly allowed: readonly string[],
  ) {
    super(
      `registry ${registry} is not in this tenant tier's registry allow-list (${allowed.length ? allowed.join(", ") : "empty"}); use an allowed registry or ask the operator to change the tier's allowed registries`,
    );
  }
}

/** A local-transport path outside the operator's UNKEY_BUILDERD_LOCAL_IMAGE_DIRS. */
export class LocalPathNotAllowedError extends PermissionDeniedError {
  constructor(
    readonly path: string,
    readonly allowedDirs: readonly string[],
  ) {
    super(
      allowedDirs.length === 0
        ? `local image sources are disabled: ${path} cannot be read because UNKEY_BUILDERD_LOCAL_IMAGE_DIRS is empty; the operator must list the directories builds may read images from`
        : `${path} is outside the directories listed in UNKEY_BUILDERD_LOCAL_IMAGE_DIRS (${allowedDirs.join(", ")}); put the image there or ask the operator to add its directory`,
    );
  }
}

/** An image (or a tag/file in a local source) that does not exist. */
export class ImageNotFoundError extends NotFoundError {
  constructor(
    readonly image: string,
    detail: string,
  ) {
    super(`image ${image} not found: ${detail}`);
  }
}

/** Content that is valid but not something builderd can turn into a rootfs. */
export class UnsupportedImageError extends FailedPreconditionError {}

/** An index / manifest list without an image for the wanted platform. */
export class PlatformNotFoundError extends FailedPreconditionError {
  constructor(
    readonly image: string,
    readonly wanted: string,
    readonly available: readonly string[],
  ) {
    super(
      `image ${image} has no ${wanted} variant; available platforms: ${available.length ? available.join(", ") : "none"}`,
    );
  }
}

/** Local source content that is malformed (bad JSON, missing files, unsafe archive entries). */
export class MalformedImageError extends FailedPreconditionError {}
