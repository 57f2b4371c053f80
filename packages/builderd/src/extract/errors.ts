import {
  InternalError,
  InvalidArgumentError,
  ResourceExhaustedError,
  UnimplementedError,
} from "@kiln/kit/errors";

/**
 * A layer entry that would create, write or remove something outside the rootfs (or replace the
 * rootfs root itself). The build fails: an image that tries this is hostile or broken.
 */
export class UnsafeLayerEntryError extends InvalidArgumentError {
  constructor(
    readonly entry: string,
    readonly reason: string,
  ) {
    super(`refusing layer entry ${JSON.stringify(entry)}: ${reason}; the image is unsafe to extract`);
  }
}

/** The image's extracted content outgrew the tenant's disk budget (decompression bombs end here). */
export class LayerTooLargeError extends ResourceExhaustedError {
  constructor(
    readonly limitBytes: number,
    readonly entry: string,
  ) {
    super(
      `image exceeds the tenant's MaxDiskBytes (${limitBytes} bytes) while extracting ${JSON.stringify(entry)}; ` +
        "use a smaller image or a tier with more disk",
    );
  }
}

/** A layer with more entries than any real image has (an inode bomb made of empty files). */
export class TooManyEntriesError extends ResourceExhaustedError {
  constructor(
    readonly limitEntries: number,
    readonly entry: string,
  ) {
    super(
      `layer has more than ${limitEntries} entries (stopped at ${JSON.stringify(entry)}); ` +
        "the image is too large to extract",
    );
  }
}

/** A layer that is not a well-formed tar (truncated, corrupt, unknown entry type, impossible tree). */
export class InvalidLayerError extends InvalidArgumentError {
  constructor(
    message: string,
    readonly entry: string | undefined,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** A layer media type or compression Kiln cannot read. */
export class UnsupportedLayerError extends UnimplementedError {
  constructor(
    readonly mediaType: string,
    detail: string,
  ) {
    super(`unsupported layer media type ${mediaType}: ${detail}`);
  }
}

/** A filesystem operation failed for a reason that is not the layer's fault (disk full, I/O error…). */
export class LayerEntryFailedError extends InternalError {
  constructor(
    readonly entry: string,
    cause: unknown,
    /** Where to look, when the error does not say (write errors name no file). */
    hint?: string,
  ) {
    super(
      `extracting layer entry ${JSON.stringify(entry)} failed: ${cause instanceof Error ? cause.message : String(cause)}${hint ? ` (${hint})` : ""}`,
      { cause },
    );
  }
}
