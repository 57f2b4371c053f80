/**
 * A small glob matcher for paths relative to the rootfs root ("usr/share/doc/*"):
 * `*` and `?` stay within one path segment, `**` spans segments (`a/**` is everything below a,
 * `**\/x` is x at any depth), `[abc]`/`[!a-z]` are character classes, `{a,b}` alternatives.
 * Dotfiles match like any other name. Own code rather than path.matchesGlob, which is
 * experimental in Node 20.
 */
export class GlobSyntaxError extends Error {}

export function compileGlob(pattern: string): RegExp {
  let re = "";
  let i = 0;
  let braceDepth = 0;
  const n = pattern.length;
  while (i < n) {
    const c = pattern[i]!;
    if (c === "*") {
      if (pattern[i + 1] === "*") {
        const atStart = i === 0 || pattern[i - 1] === "/";
        const next = pattern[i + 2];
        if (atStart && next === "/") {
          re += "(?:.*/)?"; // "**/" : zero or more whole segments
          i += 3;
          continue;
        }
        if (atStart && next === undefined) {
          re += ".*";
          i += 2;
          continue;
        }
        throw new GlobSyntaxError(`"**" must be a whole path segment in ${JSON.stringify(pattern)}`);
      }
      re += "[^/]*";
      i++;
    } else if (c === "?") {
      re += "[^/]";
      i++;
    } else if (c === "[") {
      const end = pattern.indexOf("]", i + 2);
      if (end < 0) throw new GlobSyntaxError(`unterminated "[" in ${JSON.stringify(pattern)}`);
      let body = pattern.slice(i + 1, end);
      const negate = body.startsWith("!") || body.startsWith("^");
      if (negate) body = body.slice(1);
      if (body === "") throw new GlobSyntaxError(`empty character class in ${JSON.stringify(pattern)}`);
      const cls = body.replace(/[\\\]^]/g, "\\$&");
      re += negate ? `(?!/)[^${cls}]` : `[${cls}]`;
      i = end + 1;
    } else if (c === "{") {
      braceDepth++;
      re += "(?:";
      i++;
    } else if (c === "}" && braceDepth > 0) {
      braceDepth--;
      re += ")";
      i++;
    } else if (c === "," && braceDepth > 0) {
      re += "|";
      i++;
    } else {
      re += c.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
      i++;
    }
  }
  if (braceDepth > 0) throw new GlobSyntaxError(`unterminated "{" in ${JSON.stringify(pattern)}`);
  return new RegExp(`^${re}$`, "s");
}
