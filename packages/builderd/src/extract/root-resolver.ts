import fs from "node:fs";
import { InvalidLayerError, UnsafeLayerEntryError } from "./errors.js";

/**
 * Resolves directory paths inside a rootfs with chroot semantics, the way securejoin does: every
 * component is lstat'ed, symlinks are followed by reading them (never by the OS), an absolute
 * target restarts at the rootfs root, and the result is a path of real directories below the root.
 * Unlike securejoin, `..` above the root is refused rather than clamped: a benign image has no
 * reason to point there, so the layer is treated as hostile.
 *
 * Results are cached for the lifetime of one layer; the applier reports every change that could
 * make them stale (a directory or symlink removed or replaced).
 */

/** Linux's MAXSYMLINKS: more hops than this is a loop (ELOOP). */
export const MAX_SYMLINK_HOPS = 40;

type Node = { kind: "dir" } | { kind: "symlink"; target: string } | { kind: "other" };

export interface RootResolverHooks {
  /** A directory that already existed was looked up (first time this layer): its stat, before changes. */
  onExistingDir?(rel: string, st: fs.Stats): void;
  /** A missing parent directory was created (mode 0755 minus umask, owned by the extracting user). */
  onCreatedDir?(rel: string): void;
}

export interface RootResolver {
  /**
   * The real directory (relative to the root, "" for the root itself) that the entry-relative
   * directory `components` names. With `create`, missing directories are created; without it, a
   * missing or non-directory path gives null. Throws UnsafeLayerEntryError naming `entry` when the
   * path leads outside the root or loops.
   */
  resolveDir(components: readonly string[], entry: string, create: boolean): string | null;
  /** `rel` is now a directory (created or confirmed by the caller). */
  setDir(rel: string): void;
  /** `rel` is now a symlink to `target`. */
  setSymlink(rel: string, target: string): void;
  /** `rel` changed into something that is not traversed (a file, a hardlink) or was removed. */
  forget(rel: string): void;
  /** A directory or symlink was removed or replaced: drop every cached resolution. */
  invalidate(): void;
}

export function createRootResolver(root: string, hooks: RootResolverHooks = {}): RootResolver {
  const nodes = new Map<string, Node>();
  // Entry directory string → resolved directory; most entries share a parent with the previous one.
  const resolved = new Map<string, string>();

  function lookup(rel: string): Node | null {
    const cached = nodes.get(rel);
    if (cached) return cached;
    let st: fs.Stats;
    try {
      st = fs.lstatSync(`${root}/${rel}`);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOENT" || code === "ENOTDIR") return null;
      throw err;
    }
    let node: Node;
    if (st.isDirectory()) {
      node = { kind: "dir" };
      hooks.onExistingDir?.(rel, st);
    } else if (st.isSymbolicLink()) {
      node = { kind: "symlink", target: fs.readlinkSync(`${root}/${rel}`) };
    } else {
      node = { kind: "other" };
    }
    nodes.set(rel, node);
    return node;
  }

  function resolveDir(components: readonly string[], entry: string, create: boolean): string | null {
    const key = components.join("/");
    const hit = resolved.get(key);
    if (hit !== undefined) return hit;

    const cur: string[] = [];
    // Index in `cur` of the first component that does not exist yet (-1: all exist).
    let missingFrom = -1;
    const stack = components.slice().reverse();
    let hops = 0;
    while (stack.length > 0) {
      const c = stack.pop()!;
      if (c === "" || c === ".") continue;
      if (c === "..") {
        if (cur.length === 0) {
          throw new UnsafeLayerEntryError(
            entry,
            `resolving ${JSON.stringify(key)} through symlinks leads above the rootfs root`,
          );
        }
        cur.pop();
        if (missingFrom >= cur.length) missingFrom = -1;
        continue;
      }
      cur.push(c);
      if (missingFrom >= 0) continue;
      const rel = cur.join("/");
      const node = lookup(rel);
      if (node === null) {
        if (!create) return null;
        missingFrom = cur.length - 1;
        continue;
      }
      if (node.kind === "dir") continue;
      if (node.kind === "symlink") {
        if (++hops > MAX_SYMLINK_HOPS) {
          throw new UnsafeLayerEntryError(
            entry,
            `too many levels of symbolic links (a symlink loop) while resolving ${JSON.stringify(key)}`,
          );
        }
        cur.pop();
        if (node.target.startsWith("/")) cur.length = 0;
        const parts = node.target.split("/");
        for (let i = parts.length - 1; i >= 0; i--) stack.push(parts[i]!);
        continue;
      }
      if (!create) return null;
      throw new InvalidLayerError(
        `layer entry ${JSON.stringify(entry)} needs ${JSON.stringify(rel)} to be a directory, but the layers made it a file; the image is corrupt`,
        entry,
      );
    }
    if (missingFrom >= 0) {
      for (let i = missingFrom; i < cur.length; i++) {
        const rel = cur.slice(0, i + 1).join("/");
        fs.mkdirSync(`${root}/${rel}`, 0o755);
        nodes.set(rel, { kind: "dir" });
        hooks.onCreatedDir?.(rel);
      }
    }
    const out = cur.join("/");
    resolved.set(key, out);
    return out;
  }

  return {
    resolveDir,
    setDir(rel) {
      nodes.set(rel, { kind: "dir" });
    },
    setSymlink(rel, target) {
      nodes.set(rel, { kind: "symlink", target });
    },
    forget(rel) {
      nodes.delete(rel);
    },
    invalidate() {
      nodes.clear();
      resolved.clear();
    },
  };
}
