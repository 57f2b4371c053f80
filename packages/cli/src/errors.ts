import { Code, ConnectError } from "@connectrpc/connect";

/** One line for the user, with the next step where there is one. */
export function describeError(err: unknown): string {
  if (!(err instanceof ConnectError)) return err instanceof Error ? err.message : String(err);
  const msg = err.rawMessage;
  switch (err.code) {
    case Code.Unavailable:
      return `service unavailable (${msg}). Is Kiln running? Try \`kiln status\`, or start it with \`kiln up\``;
    case Code.Unauthenticated:
      return `not authenticated: ${msg}. Check --data-dir (where the service token lives) or KILN_SERVICE_TOKEN`;
    case Code.NotFound:
      return `not found: ${msg}`;
    case Code.InvalidArgument:
      return `invalid request: ${msg}`;
    case Code.FailedPrecondition:
      return `cannot do that now: ${msg}`;
    case Code.ResourceExhausted:
      return `limit reached: ${msg}`;
    case Code.PermissionDenied:
      return `not allowed: ${msg}`;
    case Code.Unimplemented:
      return `not available yet: ${msg}`;
    case Code.DeadlineExceeded:
      return `timed out: ${msg}`;
    default:
      return `${Code[err.code]}: ${msg}`;
  }
}
