import { UnsafeLayerEntryError } from "./errors.js";

/**
 * Splits a tar entry name (or hardlink target) into path components relative to the rootfs,
 * refusing names that point outside it. A leading `./` is what most tar writers emit and is
 * dropped, as are empty and `.` components (`a//b`, `a/./b`, trailing `/`). An empty result is
 * the rootfs root itself.
 *
 * Unlike umoci (which rewrites `../x` to `x`), Kiln refuses: a benign image never contains such a
 * name, so one that does is hostile and the build should say so.
 */
export function entryComponents(name: string, entry: string = name, what = "path"): string[] {
  if (name.includes("\0")) throw new UnsafeLayerEntryError(entry, `the ${what} contains a NUL byte`);
  let rest = name;
  while (rest.startsWith("./")) rest = rest.slice(2);
  if (rest.startsWith("/"))
    throw new UnsafeLayerEntryError(entry, `the ${what} ${JSON.stringify(name)} is absolute`);
  const out: string[] = [];
  for (const c of rest.split("/")) {
    if (c === "" || c === ".") continue;
    if (c === "..") {
      throw new UnsafeLayerEntryError(entry, `the ${what} ${JSON.stringify(name)} has a ".." component`);
    }
    out.push(c);
  }
  return out;
}
