/** Small helpers the benches share. */

/** `--name N` from the bench's arguments, or `fallback`; anything but a number ≥ 0 is refused. */
export function option(args: string[], name: string, fallback: number): number {
  const i = args.indexOf(name);
  if (i < 0) return fallback;
  const value = Number(args[i + 1]);
  if (args[i + 1] === undefined || !Number.isFinite(value) || value < 0)
    throw new Error(`${name} needs a number ≥ 0, got ${args[i + 1] ?? "nothing"}`);
  return value;
}

/** Runs `fn`, returning how long it took (ms) and its result. */
export async function timed<T>(fn: () => Promise<T>): Promise<[number, T]> {
  const t = performance.now();
  const r = await fn();
  return [performance.now() - t, r];
}

/** The middle value (the upper one of the two middles for an even count). */
export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}
