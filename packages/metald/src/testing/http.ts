/** HTTP GETs for tests and benchmarks against VM workloads (no test framework needed). */

export type HttpOutcome = { status: number; body: string } | "timeout" | "error";

/** One GET: the response, or whether it hung ("timeout") or failed fast ("error"). */
export async function httpOutcome(url: string, timeoutMs: number): Promise<HttpOutcome> {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
    return { status: res.status, body: await res.text() };
  } catch (err) {
    return (err as Error).name === "TimeoutError" ? "timeout" : "error";
  }
}

/**
 * A GET that retries fast connection failures (not hangs) a few times; undefined when it hangs
 * past `timeoutMs` or keeps failing. Under gVisor (ptrace) 1–9% of requests to busybox httpd are
 * hung up on without an answer, with or without Kiln's forwarder in the path (docs/metald.md);
 * runc and QEMU never do. A paused VM still times out, so "does not answer" stays testable.
 */
export async function httpGet(
  url: string,
  timeoutMs: number,
): Promise<{ status: number; body: string } | undefined> {
  for (let attempt = 0; attempt < 5; attempt++) {
    const out = await httpOutcome(url, timeoutMs);
    if (typeof out === "object") return out;
    if (out === "timeout") return undefined;
    await new Promise((r) => setTimeout(r, 20));
  }
  return undefined;
}
