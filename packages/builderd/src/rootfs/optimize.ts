import type { Stats } from "node:fs";
import fs from "node:fs/promises";
import path from "node:path";
import { InvalidArgumentError } from "@kiln/kit";
import { compileGlob, GlobSyntaxError } from "./glob.js";
import { stripDebugSymbols } from "./strip.js";

/** The request's OptimizationSettings, in domain terms. */
export interface OptimizeSettings {
  removeDocs: boolean;
  removeCache: boolean;
  /** Globs of paths to remove, relative to the rootfs root (a leading "/" is allowed). */
  excludePatterns: string[];
  /** Paths never removed (nor anything below them); they win over every rule. */
  preservePaths: string[];
  stripDebugSymbols?: boolean;
}

export interface OptimizeResult {
  removedEntries: number;
  /** Bytes of regular files whose last link was removed. */
  removedBytes: number;
  strippedFiles: number;
  strippedBytes: number;
}

const FIELD = "config.target.microvm_rootfs.optimization";

interface Rule {
  source: string;
  match: RegExp;
  /** Paths the rule leaves alone even below a match (and everything under them). */
  keep: RegExp[];
}

/** Documentation, except copyright files (licences ask that they ship) and the C/English locales. */
const DOC_RULES: Array<{ pattern: string; keep?: string[] }> = [
  { pattern: "usr/share/doc/*", keep: ["usr/share/doc/*/copyright"] },
  { pattern: "usr/share/{man,info,doc-base,lintian,linda}/*" },
  { pattern: "usr/local/share/{man,info,doc}/*" },
  {
    pattern: "usr/share/locale/*",
    keep: ["usr/share/locale/locale.alias", "usr/share/locale/{C,POSIX,en}", "usr/share/locale/{C,en}[._@]*"],
  },
];

/**
 * Package manager and language caches. /var/cache/debconf stays: despite its place it is
 * debconf's configuration database, not a cache.
 */
const CACHE_RULES: Array<{ pattern: string; keep?: string[] }> = [
  { pattern: "var/cache/*", keep: ["var/cache/debconf"] },
  { pattern: "var/lib/apt/lists/*" },
  { pattern: "{root,home/*}/.cache" },
  { pattern: "{root,home/*}/.npm/_cacache" },
  { pattern: "{tmp,var/tmp}/*" },
  { pattern: "**/__pycache__" },
];

/** Kiln's own injected init must survive any pattern. */
const ALWAYS_PRESERVED = [".kiln"];

/**
 * Removes documentation, caches and excluded paths from an extracted rootfs, and optionally
 * strips debug symbols. Never follows a symlink while walking or deleting: a link is removed as
 * a link, and a directory reached through one is never entered, so nothing outside the rootfs is
 * touched. Invalid patterns (including any `..` segment) are refused before anything is removed.
 */
export async function optimizeRootfs(rootfs: string, s: OptimizeSettings): Promise<OptimizeResult> {
  const rules: Rule[] = [];
  const addRules = (source: string, list: Array<{ pattern: string; keep?: string[] }>) => {
    for (const r of list) {
      rules.push({ source, match: compileGlob(r.pattern), keep: (r.keep ?? []).map((k) => compileGlob(k)) });
    }
  };
  if (s.removeDocs) addRules("docs", DOC_RULES);
  if (s.removeCache) addRules("cache", CACHE_RULES);
  s.excludePatterns.forEach((p, i) => {
    const pattern = normalizeRelative(p, `${FIELD}.exclude_patterns[${i}]`, "exclude pattern");
    try {
      rules.push({ source: "exclude", match: compileGlob(pattern), keep: [] });
    } catch (err) {
      if (err instanceof GlobSyntaxError) {
        throw new InvalidArgumentError(`exclude pattern ${JSON.stringify(p)}: ${err.message}`, {
          field: `${FIELD}.exclude_patterns[${i}]`,
          cause: err,
        });
      }
      throw err;
    }
  });
  const preserved = [
    ...ALWAYS_PRESERVED,
    ...s.preservePaths.map((p, i) => normalizeRelative(p, `${FIELD}.preserve_paths[${i}]`, "preserve path")),
  ];
  const root = await fs.realpath(rootfs);
  const result: OptimizeResult = { removedEntries: 0, removedBytes: 0, strippedFiles: 0, strippedBytes: 0 };

  const isPreserved = (rel: string) => preserved.some((p) => rel === p || rel.startsWith(`${p}/`));
  const ruleFor = (rel: string) => rules.find((r) => r.match.test(rel));

  const removeEntry = async (abs: string, st: Stats): Promise<void> => {
    if (st.isDirectory()) {
      try {
        await fs.rmdir(abs);
      } catch (err) {
        // Something below was kept: the directory stays.
        if ((err as NodeJS.ErrnoException).code === "ENOTEMPTY") return;
        throw err;
      }
    } else {
      await fs.unlink(abs);
      if (st.isFile() && st.nlink === 1) result.removedBytes += st.size;
    }
    result.removedEntries++;
  };

  // `removing` is the rule that matched an ancestor: everything below goes unless kept.
  const walk = async (dirAbs: string, dirRel: string, removing: Rule | undefined): Promise<void> => {
    const names = await fs.readdir(dirAbs);
    for (const name of names) {
      const rel = dirRel === "" ? name : `${dirRel}/${name}`;
      const abs = path.join(dirAbs, name);
      if (isPreserved(rel)) continue;
      const rule = removing ?? ruleFor(rel);
      if (rule?.keep.some((k) => k.test(rel))) continue;
      const st = await fs.lstat(abs);
      if (st.isDirectory()) {
        await walk(abs, rel, rule);
        if (rule) await removeEntry(abs, st);
      } else if (rule) {
        await removeEntry(abs, st);
      }
    }
  };
  if (rules.length > 0) await walk(root, "", undefined);

  if (s.stripDebugSymbols) {
    const stripped = await stripDebugSymbols(root, (rel) => isPreserved(rel));
    result.strippedFiles = stripped.files;
    result.strippedBytes = stripped.bytesSaved;
  }
  return result;
}

/** "/usr/share/doc/" → "usr/share/doc"; refuses empty, NUL and any ".." segment. */
function normalizeRelative(p: string, field: string, what: string): string {
  const trimmed = p.replace(/^\/+/, "").replace(/\/+$/, "");
  if (trimmed === "" || p.includes("\0")) {
    throw new InvalidArgumentError(`${what} ${JSON.stringify(p)} is empty or contains NUL`, { field });
  }
  const segments = trimmed.split("/");
  if (segments.includes("..")) {
    throw new InvalidArgumentError(
      `${what} ${JSON.stringify(p)} must not contain ".."; paths are inside the rootfs`,
      {
        field,
      },
    );
  }
  return segments.filter((seg) => seg !== "" && seg !== ".").join("/");
}
