import fs from "node:fs/promises";

/** Whether something exists at `p` (following symlinks); false for any error reaching it. */
export function pathExists(p: string): Promise<boolean> {
  return fs.access(p).then(
    () => true,
    () => false,
  );
}
