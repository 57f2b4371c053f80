/**
 * Calls `fn` at most once per `intervalMs`: a call inside the interval is deferred to its end
 * (once, however many calls came in between), so the last value is never lost. `force` calls at
 * once. Progress of a download changes on every network chunk (hundreds per second); followers
 * need a few updates per second, and each one is serialized and sent to every follower.
 */
export interface Throttle {
  call(force?: boolean): void;
  /** Drops a deferred call (the build ended: nothing stale may follow its final state). */
  cancel(): void;
}

export function createThrottle(intervalMs: number, fn: () => void, now: () => number = Date.now): Throttle {
  let last = Number.NEGATIVE_INFINITY;
  let timer: NodeJS.Timeout | undefined;
  const fire = () => {
    clearTimeout(timer);
    timer = undefined;
    last = now();
    fn();
  };
  return {
    call(force = false) {
      const wait = last + intervalMs - now();
      if (force || wait <= 0) fire();
      else timer ??= setTimeout(fire, wait);
    },
    cancel() {
      clearTimeout(timer);
      timer = undefined;
    },
  };
}
