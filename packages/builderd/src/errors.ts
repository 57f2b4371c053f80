import { NotFoundError, ResourceExhaustedError } from "@kiln/kit";

export class BuildNotFoundError extends NotFoundError {
  constructor(
    readonly buildId: string,
    readonly tenantId: string,
  ) {
    super(`build ${buildId} not found`);
  }
}

/** A tenant limit reached; the message names the limit, as the issue asks. */
export class QuotaExceededError extends ResourceExhaustedError {
  constructor(
    readonly limit: string,
    readonly value: number,
    detail: string,
  ) {
    super(`${limit} (${value}) reached: ${detail}`);
  }
}
