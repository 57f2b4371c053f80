import { create } from "@bufbuild/protobuf";
import { builderd, metald } from "@kiln/api";
import { describe, expect, it } from "vitest";
import { InvalidArgumentError } from "../errors.js";
import { assertValid, violations } from "./validator.js";

const build = (init: Parameters<typeof create<typeof builderd.CreateBuildRequestSchema>>[1]) =>
  create(builderd.CreateBuildRequestSchema, init);

const okBuild = () =>
  build({
    config: {
      source: { sourceType: { case: "dockerImage", value: { imageUri: "docker://127.0.0.1:5000/app:1" } } },
      labels: { "app.kiln.dev/name": "web" },
    },
  });

describe("violations", () => {
  it("accepts a valid request", () => {
    expect(violations(builderd.CreateBuildRequestSchema, okBuild())).toEqual([]);
  });

  it("reports a missing required message by its field path", () => {
    expect(violations(builderd.CreateBuildRequestSchema, build({}))).toEqual([
      { field: "config", message: "is required" },
    ]);
  });

  it("reports a required oneof with its members", () => {
    const v = violations(builderd.CreateBuildRequestSchema, build({ config: { source: {} } }));
    expect(v).toEqual([
      {
        field: "config.source.source_type",
        message: "one of docker_image, git_repository, archive is required",
      },
    ]);
  });

  it("recurses into nested messages and names the deepest field", () => {
    const v = violations(
      builderd.CreateBuildRequestSchema,
      build({ config: { source: { sourceType: { case: "dockerImage", value: { imageUri: "" } } } } }),
    );
    expect(v).toEqual([{ field: "config.source.docker_image.image_uri", message: "is required" }]);
  });

  it("checks map keys and value lengths", () => {
    const req = okBuild();
    req.config!.labels = { "Bad Key": "x" };
    expect(violations(builderd.CreateBuildRequestSchema, req)).toEqual([
      {
        field: 'config.labels["Bad Key"] (key)',
        message: '"Bad Key" is not a label key: 1-63 characters [a-z0-9._/-]',
      },
    ]);
  });

  it("leaves optional fields alone when empty but checks their format when set", () => {
    const req = okBuild();
    req.config!.suggestedAssetId = "";
    expect(violations(builderd.CreateBuildRequestSchema, req)).toEqual([]);
    req.config!.suggestedAssetId = "../etc";
    expect(violations(builderd.CreateBuildRequestSchema, req)[0]?.field).toBe("config.suggested_asset_id");
  });

  it("checks numeric bounds, env names and list sizes on VM configs", () => {
    const req = create(metald.CreateVmRequestSchema, {
      config: {
        rootfsAssetId: "ast_1",
        cpu: { vcpuCount: 1000 },
        env: { "1BAD": "x", GOOD_NAME: "y" },
      },
    });
    const fields = violations(metald.CreateVmRequestSchema, req).map((v) => v.field);
    expect(fields).toContain("config.cpu.vcpu_count");
    expect(fields).toContain('config.env["1BAD"] (key)');
    expect(fields).not.toContain('config.env["GOOD_NAME"] (key)');
  });

  it("rejects enum numbers the enum does not declare", () => {
    const req = create(builderd.ListBuildsRequestSchema, { stateFilter: [99 as builderd.BuildState] });
    const v = violations(builderd.ListBuildsRequestSchema, req);
    expect(v.map((x) => x.message).join()).toMatch(/99 is not a value of kiln.builderd.v1.BuildState/);
  });
});

describe("assertValid", () => {
  it("throws InvalidArgumentError naming the message and every bad field", () => {
    let err: unknown;
    try {
      assertValid(builderd.CreateBuildRequestSchema, build({}));
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(InvalidArgumentError);
    expect((err as InvalidArgumentError).message).toBe("invalid CreateBuildRequest: config: is required");
    expect((err as InvalidArgumentError).field).toBe("config");
  });
});
