import { describe, expect, it } from "vitest";
import { MalformedImageError, PlatformNotFoundError, UnsupportedImageError } from "./errors.js";
import { type Descriptor, parseImageConfig, parseManifest, selectPlatform, toLayerInfo } from "./manifest.js";

const D = (c: string) => `sha256:${c.repeat(64)}`;
const doc = (v: unknown) => Buffer.from(JSON.stringify(v));
const config = { mediaType: "application/vnd.oci.image.config.v1+json", digest: D("c"), size: 10 };

describe("parseManifest", () => {
  it("refuses schema 1 manifests with a way out", () => {
    for (const [body, type] of [
      [{ schemaVersion: 1, name: "x", fsLayers: [] }, undefined],
      [{ schemaVersion: 2 }, "application/vnd.docker.distribution.manifest.v1+prettyjws"],
    ] as const) {
      const err = (() => {
        try {
          parseManifest(doc(body), type, "manifest m");
        } catch (e) {
          return e as Error;
        }
      })();
      expect(err).toBeInstanceOf(UnsupportedImageError);
      expect(err?.message).toContain("Docker schema 1 manifest");
      expect(err?.message).toContain("push the image again");
    }
  });

  it("takes the media type from the document, then the Content-Type, then the shape", () => {
    const m = parseManifest(doc({ schemaVersion: 2, config, layers: [] }), "application/json", "m");
    expect(m).toMatchObject({ kind: "manifest", mediaType: "application/vnd.oci.image.manifest.v1+json" });
    const list = parseManifest(
      doc({ schemaVersion: 2, manifests: [] }),
      "application/vnd.docker.distribution.manifest.list.v2+json; charset=utf-8",
      "m",
    );
    expect(list).toMatchObject({
      kind: "index",
      mediaType: "application/vnd.docker.distribution.manifest.list.v2+json",
    });
  });

  it("refuses artifacts, unknown types and malformed descriptors", () => {
    expect(() =>
      parseManifest(
        doc({
          schemaVersion: 2,
          config: { ...config, mediaType: "application/vnd.cncf.helm.config.v1+json" },
          layers: [],
        }),
        undefined,
        "m",
      ),
    ).toThrow(/not a container image.*helm/);
    expect(() =>
      parseManifest(doc({ schemaVersion: 2, mediaType: "application/x-other" }), undefined, "m"),
    ).toThrow(UnsupportedImageError);
    expect(() =>
      parseManifest(
        doc({ schemaVersion: 2, config: { ...config, digest: "md5:x" }, layers: [] }),
        undefined,
        "m",
      ),
    ).toThrow(/sha256 digests only/);
    expect(() =>
      parseManifest(doc({ schemaVersion: 2, config: { ...config, size: -1 }, layers: [] }), undefined, "m"),
    ).toThrow(MalformedImageError);
    expect(() => parseManifest(Buffer.from("{nope"), undefined, "manifest m")).toThrow(
      /manifest m is not valid JSON/,
    );
  });
});

describe("toLayerInfo", () => {
  it.each([
    ["application/vnd.oci.image.layer.v1.tar", "none"],
    ["application/vnd.oci.image.layer.v1.tar+gzip", "gzip"],
    ["application/vnd.oci.image.layer.v1.tar+zstd", "zstd"],
    ["application/vnd.docker.image.rootfs.diff.tar.gzip", "gzip"],
  ])("classifies %s as %s", (mediaType, compression) => {
    expect(toLayerInfo({ mediaType, digest: D("1"), size: 5 }, "layer 1")).toEqual({
      mediaType,
      digest: D("1"),
      size: 5,
      compression,
    });
  });

  it("refuses foreign (non-distributable) and non-tar layers", () => {
    for (const mediaType of [
      "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
      "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    ]) {
      expect(() => toLayerInfo({ mediaType, digest: D("1"), size: 5 }, "layer 1")).toThrow(
        /non-distributable \(foreign\) layer/,
      );
    }
    expect(() =>
      toLayerInfo(
        { mediaType: "application/vnd.cncf.helm.chart.content.v1.tar+gzip", digest: D("1"), size: 5 },
        "layer 1",
      ),
    ).toThrow(/not a tar layer/);
  });
});

describe("selectPlatform", () => {
  const m = (
    architecture: string,
    variant?: string,
    mediaType = "application/vnd.oci.image.manifest.v1+json",
  ): Descriptor => ({
    mediaType,
    digest: D(String(architecture.length % 10)),
    size: 1,
    platform: { os: "linux", architecture, ...(variant ? { variant } : {}) },
  });

  it("prefers linux/amd64 without a variant and otherwise takes any amd64 variant", () => {
    const plain = { ...m("amd64"), digest: D("a") };
    const v3 = { ...m("amd64", "v3"), digest: D("b") };
    expect(selectPlatform([m("arm64"), v3, plain], { os: "linux", architecture: "amd64" }, "img")).toBe(
      plain,
    );
    expect(selectPlatform([m("arm64"), v3], { os: "linux", architecture: "amd64" }, "img")).toBe(v3);
    expect(selectPlatform([plain, v3], { os: "linux", architecture: "amd64", variant: "v3" }, "img")).toBe(
      v3,
    );
  });

  it("lists available platforms, leaving out attestations", () => {
    const attestation: Descriptor = { ...m("unknown"), platform: { os: "unknown", architecture: "unknown" } };
    const err = (() => {
      try {
        selectPlatform(
          [m("arm64", "v8"), m("s390x"), attestation],
          { os: "linux", architecture: "amd64" },
          "img",
        );
      } catch (e) {
        return e as Error;
      }
    })();
    expect(err).toBeInstanceOf(PlatformNotFoundError);
    expect(err?.message).toBe(
      "image img has no linux/amd64 variant; available platforms: linux/arm64/v8, linux/s390x",
    );
  });
});

describe("parseImageConfig", () => {
  it("keeps well-typed fields and drops the rest", () => {
    const c = parseImageConfig(
      doc({
        architecture: "amd64",
        os: "linux",
        config: {
          Entrypoint: ["/x"],
          Cmd: "not-a-list",
          Env: ["A=1"],
          User: "1000",
          Labels: { a: "b", n: 1 },
        },
        rootfs: { type: "layers", diff_ids: [D("d")] },
      }),
      "config",
    );
    expect(c).toEqual({
      architecture: "amd64",
      os: "linux",
      config: { Entrypoint: ["/x"], Env: ["A=1"], User: "1000", Labels: { a: "b" } },
      rootfs: { type: "layers", diff_ids: [D("d")] },
    });
  });
});
