import fs from "node:fs";
import path from "node:path";
import { tempDir } from "@kiln/kit/testing";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import {
  BLOCK_SIZE,
  DATA_START_BLOCK,
  decodePlaceholder,
  encodePlaceholder,
  newNonce,
  restoreContent,
} from "./data-area.js";

let tmp: { path: string; remove(): void };
beforeEach(() => {
  tmp = tempDir("kiln-data-area-");
});
afterEach(() => tmp.remove());

describe("placeholders", () => {
  it("name an extent only for the build whose nonce they carry", () => {
    const nonce = newNonce();
    const p = encodePlaceholder(nonce, { block: DATA_START_BLOCK + 7, length: 12345 });
    expect(decodePlaceholder(p, nonce)).toEqual({ block: DATA_START_BLOCK + 7, length: 12345, xattrs: [] });
    expect(decodePlaceholder(p, newNonce())).toBeUndefined();
    expect(decodePlaceholder(Buffer.concat([p, Buffer.from("x")]), nonce)).toBeUndefined();
    expect(() => encodePlaceholder(nonce.subarray(0, 8), { block: 1, length: 1 })).toThrow(RangeError);
  });

  it("carry the file's extended attributes, byte for byte, also for a file with no content", () => {
    const nonce = newNonce();
    const xattrs = [
      { name: "security.capability", value: Buffer.from("0100000200200000000000000000000000000000", "hex") },
      { name: "user.empty", value: Buffer.alloc(0) },
      { name: "user.ünïcode", value: Buffer.from([0xff, 0xfe, 0x80, 0]) },
    ];
    const p = encodePlaceholder(nonce, { block: DATA_START_BLOCK, length: 0 }, xattrs);
    expect(decodePlaceholder(p, nonce)).toEqual({ block: DATA_START_BLOCK, length: 0, xattrs });
    // Cut anywhere, or with a byte more, it is no placeholder (the head names its exact size).
    for (const n of [p.length - 1, p.length - 5, 70])
      expect(decodePlaceholder(p.subarray(0, n), nonce)).toBeUndefined();
    expect(decodePlaceholder(Buffer.concat([p, Buffer.from([0])]), nonce)).toBeUndefined();
    // A forged size field cannot make the reader run past the end.
    const forged = Buffer.from(p);
    forged.writeUInt16LE(0xffff, 64);
    expect(decodePlaceholder(forged, nonce)).toBeUndefined();
    expect(() =>
      encodePlaceholder(nonce, { block: DATA_START_BLOCK, length: 0 }, [
        { name: "user.big", value: Buffer.alloc(BLOCK_SIZE) },
      ]),
    ).toThrow(RangeError);
  });

  it("restoreContent puts a placeholder's content back, keeping inode, mode and times", async () => {
    const nonce = newNonce();
    const image = path.join(tmp.path, "image");
    const content = Buffer.from("root:x:0:0:root:/root:/bin/sh\nwww:x:33:33::/var/www:/bin/false\n");
    fs.writeFileSync(image, "");
    const fd = fs.openSync(image, "r+");
    fs.writeSync(fd, content, 0, content.length, DATA_START_BLOCK * BLOCK_SIZE);
    fs.closeSync(fd);
    const passwd = path.join(tmp.path, "passwd");
    fs.writeFileSync(passwd, encodePlaceholder(nonce, { block: DATA_START_BLOCK, length: content.length }), {
      mode: 0o644,
    });
    fs.linkSync(passwd, path.join(tmp.path, "passwd-link"));
    fs.utimesSync(passwd, 1_600_000_000, 1_500_000_000);
    const before = fs.statSync(passwd);

    await restoreContent(passwd, image, nonce);
    expect(fs.readFileSync(passwd)).toEqual(content);
    expect(fs.readFileSync(path.join(tmp.path, "passwd-link"))).toEqual(content);
    const after = fs.statSync(passwd);
    expect([after.ino, after.mode, after.mtimeMs]).toEqual([before.ino, before.mode, before.mtimeMs]);

    // Anything else is left as it is: real content, another build's placeholder, a missing file.
    const other = encodePlaceholder(newNonce(), { block: DATA_START_BLOCK, length: 5 });
    fs.writeFileSync(path.join(tmp.path, "other"), other);
    await restoreContent(path.join(tmp.path, "other"), image, nonce);
    expect(fs.readFileSync(path.join(tmp.path, "other"))).toEqual(other);
    await restoreContent(passwd, image, nonce);
    expect(fs.readFileSync(passwd)).toEqual(content);
    await expect(restoreContent(path.join(tmp.path, "missing"), image, nonce)).resolves.toBeUndefined();
  });
});
