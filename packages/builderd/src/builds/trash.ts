import { randomBytes } from "node:crypto";
import fsp from "node:fs/promises";
import path from "node:path";
import type { Logger } from "@kiln/kit";

/**
 * Directories deleted later, off a build's critical path. `discard` renames a directory into the
 * trash (same filesystem: atomic and instant, so its old path is free at once); `purge` deletes
 * what the trash holds, in the background. A finished build's extracted tree is thousands of
 * inodes: the manager purges once the build's result is recorded, so the deletion competes
 * neither with mkfs nor with the image's registration (whose reads would queue behind it in
 * libuv's threadpool). A crash leaves at most entries in the trash, which `sweep` deletes at
 * start-up; `drain` waits for the deletions under way (graceful stop, tests).
 *
 * There is one trash directory per filesystem the trees live on (the data dir's, and a tmpfs
 * for trees: builds/tree-root.ts): a directory goes into the first one it can be renamed into.
 */
export interface Trash {
  /** Moves `dir` into the trash; a missing `dir` is fine. */
  discard(dir: string): Promise<void>;
  /** Starts deleting, in the background, everything discarded so far. */
  purge(): void;
  /** Resolves once every deletion started so far has ended. */
  drain(): Promise<void>;
  /** Deletes whatever an earlier process left in the trash, and waits for it. */
  sweep(): Promise<void>;
}

export function createTrash(dirs: string[], log: Logger): Trash {
  const pending = new Set<Promise<void>>();
  let discarded: string[] = [];
  const made = new Map<string, Promise<unknown>>();

  const drain = async () => {
    while (pending.size > 0) await Promise.all([...pending]);
  };
  const remove = (target: string) => {
    const p = fsp
      .rm(target, { recursive: true, force: true })
      .catch((err: unknown) =>
        log.warn({ err, path: target }, "could not delete from the trash; retried at start-up"),
      )
      .finally(() => pending.delete(p));
    pending.add(p);
  };

  return {
    async discard(target) {
      for (const dir of dirs) {
        const ready = made.get(dir) ?? fsp.mkdir(dir, { recursive: true, mode: 0o700 });
        made.set(dir, ready);
        try {
          await ready;
        } catch (err) {
          made.delete(dir);
          throw err;
        }
        const dest = path.join(dir, `${path.basename(target)}-${randomBytes(6).toString("hex")}`);
        try {
          await fsp.rename(target, dest);
          discarded.push(dest);
          return;
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code;
          if (code === "ENOENT") return;
          if (code !== "EXDEV") throw err;
        }
      }
      // On no trash's filesystem: delete it where it is, waiting for it.
      await fsp.rm(target, { recursive: true, force: true });
    },

    purge() {
      const now = discarded;
      discarded = [];
      for (const d of now) remove(d);
    },

    drain,

    async sweep() {
      for (const dir of dirs) {
        let names: string[];
        try {
          names = await fsp.readdir(dir);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === "ENOENT") continue;
          throw err;
        }
        for (const name of names) remove(path.join(dir, name));
      }
      await drain();
    },
  };
}
