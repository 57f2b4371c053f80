import { FailedPreconditionError, NotFoundError, PermissionDeniedError, UnavailableError } from "@kiln/kit";

/** Errors of the registry client. Messages name the registry; they never carry credentials. */

/** The registry (or its token service) did not accept the credentials, or demands some. */
export class RegistryAuthError extends PermissionDeniedError {
  constructor(
    readonly registry: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** The registry does not have the manifest or blob. */
export class RegistryNotFoundError extends NotFoundError {
  constructor(
    readonly registry: string,
    readonly repository: string,
    readonly reference: string,
    detail: string,
  ) {
    super(`${registry}/${repository}: ${reference} not found (${detail})`);
  }
}

/** A 4xx answer the client cannot do anything about. */
export class RegistryRequestError extends FailedPreconditionError {
  constructor(
    readonly registry: string,
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

/** The registry kept failing (5xx, 429, network errors, timeouts) through every retry. */
export class RegistryUnavailableError extends UnavailableError {
  constructor(
    readonly registry: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** A document (manifest, config, token answer) larger than builderd accepts. */
export class ResponseTooLargeError extends FailedPreconditionError {
  constructor(
    readonly what: string,
    readonly maxBytes: number,
  ) {
    super(`${what} is larger than the ${maxBytes} bytes builderd accepts`);
  }
}
