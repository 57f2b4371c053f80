import fs from "node:fs";
import { UnsafeLayerEntryError } from "./errors.js";

/**
 * OCI layer whiteouts (image-spec layer.md): an entry named `.wh.NAME` removes NAME from the lower
 * layers and is not itself created; `.wh..wh..opq` in a directory removes all of the directory's
 * lower-layer children. Whiteouts apply only to lower layers: whatever the same layer creates
 * stays, whether it comes before or after the whiteout in the tar. The applier tracks that set of
 * "upper" paths (created by this layer, and their ancestors) and removal here skips them — the
 * rule umoci follows, which makes the result independent of entry order.
 */

export const WHITEOUT_PREFIX = ".wh.";
export const OPAQUE_WHITEOUT = ".wh..wh..opq";

export type Whiteout = { kind: "opaque" } | { kind: "remove"; name: string };

/** The whiteout an entry's base name denotes, or null for ordinary content. */
export function classifyWhiteout(base: string, entry: string): Whiteout | null {
  if (base === OPAQUE_WHITEOUT) return { kind: "opaque" };
  if (!base.startsWith(WHITEOUT_PREFIX)) return null;
  const name = base.slice(WHITEOUT_PREFIX.length);
  // `.wh.`, `.wh..` and `.wh...` would name the directory holding the marker or its parent; obeying
  // them lets a layer erase trees it has no business with (umoci 0.4.7 removes the rootfs itself).
  if (name === "" || name === "." || name === "..") {
    throw new UnsafeLayerEntryError(entry, `the whiteout ${JSON.stringify(base)} names no sibling entry`);
  }
  return { kind: "remove", name };
}

/**
 * Removes `rel` (a path under `root` whose parents are real directories) and everything below it
 * that is not in `upper`; with `keepTop` the node itself stays and only its lower children go (an
 * opaque directory). Symlinks are removed, never followed. `onRemoved` hears of every removed
 * subtree (its top path and what it was), so callers can drop what they cached about it.
 */
export function removeLower(
  root: string,
  rel: string,
  upper: ReadonlySet<string>,
  keepTop: boolean,
  onRemoved: (rel: string, st: fs.Stats) => void,
): void {
  const abs = rel === "" ? root : `${root}/${rel}`;
  const st = lstatOrNull(abs);
  if (!st) return;
  if (!keepTop && !upper.has(rel)) {
    if (st.isDirectory()) fs.rmSync(abs, { recursive: true, force: true });
    else fs.unlinkSync(abs);
    onRemoved(rel, st);
    return;
  }
  if (!st.isDirectory()) return;
  for (const child of fs.readdirSync(abs)) {
    removeLower(root, rel === "" ? child : `${rel}/${child}`, upper, false, onRemoved);
  }
}

function lstatOrNull(abs: string): fs.Stats | null {
  try {
    return fs.lstatSync(abs);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT" || code === "ENOTDIR") return null;
    throw err;
  }
}
