import { Code, ConnectError } from "@connectrpc/connect";

/**
 * Kiln's error classes. Each maps one-to-one onto a Connect code (as containerd's errdefs do);
 * domain modules throw subclasses that carry their ids, and one interceptor converts them at the
 * RPC edge. Messages are for the user: name the field or state, and the fix.
 *
 * `instanceof` uses a symbol brand so it stays true across duplicated copies of this package.
 */
const brand = Symbol.for("kiln.error");

export abstract class KilnError extends Error {
  abstract readonly code: Code;
  readonly [brand] = true;

  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }

  static override [Symbol.hasInstance](value: unknown): boolean {
    if (typeof value !== "object" || value === null || !(brand in value)) return false;
    // For subclasses, fall back to the prototype chain (e.g. `x instanceof NotFoundError`).
    // biome-ignore lint/complexity/noThisInStatic: `this` is the class `instanceof` was called on
    return this === KilnError || Function.prototype[Symbol.hasInstance].call(this, value);
  }
}

export class NotFoundError extends KilnError {
  readonly code = Code.NotFound;
}
export class AlreadyExistsError extends KilnError {
  readonly code = Code.AlreadyExists;
}
export class InvalidArgumentError extends KilnError {
  readonly code = Code.InvalidArgument;
  /** The offending field path, e.g. `config.source.docker_image.image_uri`, when known. */
  readonly field: string | undefined;
  constructor(message: string, options?: { cause?: unknown; field?: string }) {
    super(message, options);
    this.field = options?.field;
  }
}
export class FailedPreconditionError extends KilnError {
  readonly code = Code.FailedPrecondition;
}
export class ResourceExhaustedError extends KilnError {
  readonly code = Code.ResourceExhausted;
}
export class UnauthenticatedError extends KilnError {
  readonly code = Code.Unauthenticated;
}
export class PermissionDeniedError extends KilnError {
  readonly code = Code.PermissionDenied;
}
export class UnimplementedError extends KilnError {
  readonly code = Code.Unimplemented;
}
export class UnavailableError extends KilnError {
  readonly code = Code.Unavailable;
}
export class DeadlineExceededError extends KilnError {
  readonly code = Code.DeadlineExceeded;
}
export class CanceledError extends KilnError {
  readonly code = Code.Canceled;
}
export class InternalError extends KilnError {
  readonly code = Code.Internal;
}

/**
 * Converts anything thrown by a handler into a ConnectError. Kiln errors keep their message;
 * anything else becomes `internal` with a generic message (details go to the log, not the caller).
 */
export function toConnectError(err: unknown): ConnectError {
  if (err instanceof ConnectError) return err;
  if (err instanceof KilnError) return new ConnectError(err.message, err.code, undefined, undefined, err);
  return new ConnectError(
    "internal error; see the service log for details",
    Code.Internal,
    undefined,
    undefined,
    err,
  );
}

/** True when the error is an expected, user-facing outcome (logged at info, not error). */
export function isClientError(code: Code): boolean {
  return (
    code === Code.InvalidArgument ||
    code === Code.NotFound ||
    code === Code.AlreadyExists ||
    code === Code.FailedPrecondition ||
    code === Code.ResourceExhausted ||
    code === Code.Unauthenticated ||
    code === Code.PermissionDenied ||
    code === Code.Unimplemented ||
    code === Code.Canceled ||
    code === Code.OutOfRange
  );
}
