import { InvalidArgumentError } from "@kiln/kit";
import { describe, expect, it } from "vitest";
import { formatImageRef, parseImageRef } from "./reference.js";

const D = `sha256:${"a".repeat(64)}`;

describe("parseImageRef", () => {
  it.each([
    [
      "alpine",
      "docker",
      { registry: "docker.io", repository: "library/alpine", tag: "latest" },
      "docker://docker.io/library/alpine:latest",
    ],
    [
      "alpine:3.20",
      "docker",
      { registry: "docker.io", repository: "library/alpine", tag: "3.20" },
      "docker://docker.io/library/alpine:3.20",
    ],
    [
      "docker://alpine:3.20",
      "docker",
      { registry: "docker.io", repository: "library/alpine", tag: "3.20" },
      "docker://docker.io/library/alpine:3.20",
    ],
    [
      "bitnami/nginx",
      "docker",
      { registry: "docker.io", repository: "bitnami/nginx", tag: "latest" },
      "docker://docker.io/bitnami/nginx:latest",
    ],
    [
      "index.docker.io/library/busybox:1",
      "docker",
      { registry: "docker.io", repository: "library/busybox", tag: "1" },
      "docker://docker.io/library/busybox:1",
    ],
    [
      "docker://ghcr.io/org/app/sub:v1.2_3-x",
      "docker",
      { registry: "ghcr.io", repository: "org/app/sub", tag: "v1.2_3-x" },
      "docker://ghcr.io/org/app/sub:v1.2_3-x",
    ],
    [
      "docker://127.0.0.1:5000/kiln/app:t",
      "docker",
      { registry: "127.0.0.1:5000", repository: "kiln/app", tag: "t" },
      "docker://127.0.0.1:5000/kiln/app:t",
    ],
    [
      "localhost/app",
      "docker",
      { registry: "localhost", repository: "app", tag: "latest" },
      "docker://localhost/app:latest",
    ],
    [
      "localhost:5000/app",
      "docker",
      { registry: "localhost:5000", repository: "app", tag: "latest" },
      "docker://localhost:5000/app:latest",
    ],
    [
      "[::1]:5000/app:1",
      "docker",
      { registry: "[::1]:5000", repository: "app", tag: "1" },
      "docker://[::1]:5000/app:1",
    ],
    [
      "Registry.Example.com/a/b",
      "docker",
      { registry: "registry.example.com", repository: "a/b", tag: "latest" },
      "docker://registry.example.com/a/b:latest",
    ],
    [
      `alpine@${D}`,
      "docker",
      { registry: "docker.io", repository: "library/alpine", digest: D },
      `docker://docker.io/library/alpine@${D}`,
    ],
    [
      `quay.io/a/b:1@${D}`,
      "docker",
      { registry: "quay.io", repository: "a/b", tag: "1", digest: D },
      `docker://quay.io/a/b:1@${D}`,
    ],
    [
      "a__b/c-d.e",
      "docker",
      { registry: "docker.io", repository: "a__b/c-d.e", tag: "latest" },
      "docker://docker.io/a__b/c-d.e:latest",
    ],
    [
      "dir:latest",
      "docker",
      { registry: "docker.io", repository: "library/dir", tag: "latest" },
      "docker://docker.io/library/dir:latest",
    ],
    ["oci:/images/layout", "oci", { path: "/images/layout" }, "oci:/images/layout"],
    [
      "oci:/images/layout:v1.0+b",
      "oci",
      { path: "/images/layout", tag: "v1.0+b" },
      "oci:/images/layout:v1.0+b",
    ],
    ["oci:/images//x/../layout/", "oci", { path: "/images/layout/" }, "oci:/images/layout/"],
    [
      "oci-archive:/images/app.tar",
      "oci-archive",
      { path: "/images/app.tar" },
      "oci-archive:/images/app.tar",
    ],
    [
      "oci-archive:/images/app.tar:v2",
      "oci-archive",
      { path: "/images/app.tar", tag: "v2" },
      "oci-archive:/images/app.tar:v2",
    ],
    [
      "docker-archive:/images/save.tar",
      "docker-archive",
      { path: "/images/save.tar" },
      "docker-archive:/images/save.tar",
    ],
    [
      "docker-archive:/images/save.tar:app:1",
      "docker-archive",
      { path: "/images/save.tar", registry: "docker.io", repository: "library/app", tag: "1" },
      "docker-archive:/images/save.tar:docker.io/library/app:1",
    ],
  ])("parses %s", (uri, transport, fields, canonical) => {
    const ref = parseImageRef(uri);
    expect(ref).toEqual({ transport, raw: uri, ...fields });
    expect(formatImageRef(ref)).toBe(canonical);
    // The canonical form parses to the same image.
    const again = parseImageRef(canonical);
    expect({ ...again, raw: uri }).toEqual(ref);
  });

  it.each([
    ["", "empty"],
    ["  alpine", "whitespace"],
    ["alp ine", "whitespace"],
    ["docker://", "repository name is missing"],
    ["Alpine", "must be lowercase"],
    ["docker.io/Library/alpine", "must be lowercase"],
    ["alpine:", 'tag "" is not valid'],
    ["alpine:-x", 'tag "-x" is not valid'],
    [`alpine:${"t".repeat(129)}`, "is not valid"],
    ["alpine@sha256:abc", "is not a digest"],
    [`alpine@sha512:${"a".repeat(128)}`, 'digest algorithm "sha512" is not supported'],
    ["a//b", "is not valid"],
    ["a/-b", "is not valid"],
    ["a..b/c", "registry host"],
    ["host:99999/app", "out of range"],
    [`x/${"a".repeat(260)}`, "longer than 255"],
    ["https://registry.example.com/app", 'transport "https" is not supported'],
    ["git://github.com/a/b", 'transport "git" is not supported'],
    ["git:/srv/repo", 'transport "git" is not supported'],
    ["containers-storage:./x", 'transport "containers-storage" is not supported'],
    ["oci:", "path is missing"],
    ["oci:relative/dir", "must be absolute"],
    ["oci:/dir:", "reference after"],
    ["oci:/dir:bad/tag", "is not a valid oci: tag"],
    ["docker-archive:/x.tar:Bad", "must be lowercase"],
    [`docker-archive:/x.tar:app@${D}`, "by tag, not digest"],
  ])("refuses %j (%s)", (uri, message) => {
    let err: unknown;
    try {
      parseImageRef(uri);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(InvalidArgumentError);
    expect((err as Error).message).toContain(message);
    expect((err as Error).message).toContain(`invalid image reference ${JSON.stringify(uri)}`);
  });
});
