import { execFileSync } from "node:child_process";
import { InvalidArgumentError } from "@kiln/kit";
import { describe, expect, it } from "vitest";
import { renderInitScript, shellQuote, type WorkloadSpec } from "./run-script.js";

/** Strings a shell would misread if quoting were wrong. */
const HOSTILE = [
  "",
  " ",
  "two words",
  "it's",
  "'",
  "''",
  '"double"',
  "$(touch /tmp/kiln-pwned)",
  "`id`",
  "$HOME",
  // biome-ignore lint/suspicious/noTemplateCurlyInString: a literal shell expansion is the point
  "${PATH:-x}",
  "back\\slash",
  "trailing\\",
  "new\nline",
  "\n",
  "tab\there",
  "*",
  "/etc/*",
  "?",
  "[a-z]",
  "-n",
  "--",
  "a=b",
  "~",
  "~root",
  "!",
  "#not a comment",
  "a;b|c&d>e<f",
  "(sub)",
  "{a,b}",
  "unicode: ☃ é 日本語 🚀",
  "\u00a0nbsp",
  "\x01\x02\x1b[31m",
];

const BUSYBOX = "/bin/busybox";

/** Runs `printf '%s\0' <words>` through the real busybox sh and returns the argv it saw. */
function argvThroughShell(words: string): string[] {
  const out = execFileSync(BUSYBOX, ["sh", "-c", `printf '%s\\0' ${words}`], { encoding: "utf8" });
  return out.split("\0").slice(0, -1);
}

const spec = (over: Partial<WorkloadSpec> = {}): WorkloadSpec => ({
  entrypoint: [],
  cmd: ["httpd"],
  env: {},
  workingDir: "/",
  user: "",
  ...over,
});

describe("shellQuote", () => {
  it.each(HOSTILE.map((s) => [JSON.stringify(s), s]))("round-trips %s through busybox sh", (_name, s) => {
    expect(argvThroughShell(shellQuote(s))).toEqual([s]);
  });

  it("keeps every hostile string a separate argument when joined", () => {
    expect(argvThroughShell(HOSTILE.map(shellQuote).join(" "))).toEqual(HOSTILE);
  });

  it("leaves plain words bare and quotes the rest", () => {
    expect(shellQuote("/usr/bin/httpd")).toBe("/usr/bin/httpd");
    expect(shellQuote("--port=80")).toBe("'--port=80'");
    expect(shellQuote("it's")).toBe(`'it'\\''s'`);
    expect(shellQuote("")).toBe("''");
  });

  it("refuses NUL, which no argv can carry", () => {
    expect(() => shellQuote("a\0b")).toThrow(/NUL/);
  });
});

describe("renderInitScript", () => {
  it("is a busybox sh script that busybox parses", () => {
    const script = renderInitScript(
      spec({
        entrypoint: HOSTILE.slice(2, 8),
        cmd: HOSTILE,
        env: { A: "$(x)", "B'": "\n" },
        workingDir: "/a b/'c'",
      }),
    );
    expect(script.startsWith("#!/.kiln/busybox sh\n")).toBe(true);
    // -n: parse only.
    execFileSync(BUSYBOX, ["sh", "-n", "-c", script]);
  });

  it("runs entrypoint + cmd under tini with exactly the given environment", () => {
    const script = renderInitScript(
      spec({ entrypoint: ["/bin/app", "--x"], cmd: ["serve"], env: { PATH: "/bin", EMPTY: "" } }),
    );
    expect(script).toContain("exec $bb env -i -- 'PATH=/bin' 'EMPTY=' /.kiln/tini -s -- /bin/app --x serve");
  });

  it("uses cmd alone when there is no entrypoint, and refuses when both are empty", () => {
    expect(renderInitScript(spec({ cmd: ["a", "b"] }))).toContain("/.kiln/tini -s -- a b\n");
    const err = (() => {
      try {
        renderInitScript(spec({ cmd: [] }));
      } catch (e) {
        return e;
      }
    })();
    expect(err).toBeInstanceOf(InvalidArgumentError);
    expect((err as InvalidArgumentError).message).toMatch(/neither an entrypoint nor a cmd/);
  });

  it("switches to a numeric uid:gid with busybox nsenter, and not at all for root", () => {
    expect(renderInitScript(spec({ user: "1000:1001" }))).toContain(
      "$bb nsenter -S 1000 -G 1001 -F -- /.kiln/tini",
    );
    expect(renderInitScript(spec({ user: "1000" }))).toContain("$bb nsenter -S 1000 -G 0 -F --");
    expect(renderInitScript(spec({ user: "" }))).not.toContain("nsenter");
    expect(renderInitScript(spec({ user: "0:0" }))).not.toContain("nsenter");
  });

  it("refuses names it cannot resolve, bad env names, NUL and relative working dirs", () => {
    expect(() => renderInitScript(spec({ user: "www" }))).toThrow(/numeric uid/);
    expect(() => renderInitScript(spec({ env: { "A=B": "x" } }))).toThrow(InvalidArgumentError);
    expect(() => renderInitScript(spec({ env: { "": "x" } }))).toThrow(InvalidArgumentError);
    expect(() => renderInitScript(spec({ env: { A: "x\0" } }))).toThrow(InvalidArgumentError);
    expect(() => renderInitScript(spec({ cmd: ["a\0b"] }))).toThrow(/NUL/);
    expect(() => renderInitScript(spec({ cmd: [""] }))).toThrow(/empty/);
    expect(() => renderInitScript(spec({ workingDir: "app" }))).toThrow(/absolute/);
  });

  it("reads hostname, address, gateway and DNS from the kernel command line", () => {
    const script = renderInitScript(spec());
    for (const p of ["kiln.hostname=", "kiln.ip=", "kiln.gw=", "kiln.dns="]) expect(script).toContain(p);
    expect(script).toContain("$bb poweroff -f");
  });
});
