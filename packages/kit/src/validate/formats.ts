import { validate } from "@kiln/api";

type Format = validate.Format;
const F = validate.Format;

/** One definition per well-known string format of kiln.validate.v1.Format. */
export const FORMATS: Record<
  Exclude<Format, validate.Format.UNSPECIFIED>,
  { test(v: string): boolean; form: string }
> = {
  [F.ID]: { test: (v) => /^[a-z0-9][a-z0-9_-]{0,63}$/.test(v), form: "an id of 1-64 characters [a-z0-9_-]" },
  [F.DNS_LABEL]: {
    test: (v) => /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/.test(v),
    form: "a DNS label: 1-63 characters [a-z0-9-], not starting or ending with '-'",
  },
  [F.SHA256_DIGEST]: {
    test: (v) => /^sha256:[a-f0-9]{64}$/.test(v),
    form: "sha256: followed by 64 hex digits",
  },
  [F.ENV_NAME]: { test: (v) => /^[A-Za-z_][A-Za-z0-9_]*$/.test(v), form: "an environment variable name" },
  [F.RELATIVE_PATH]: {
    test: (v) =>
      v.length > 0 &&
      !v.startsWith("/") &&
      !v.includes("\0") &&
      v.split("/").every((seg) => seg !== "" && seg !== "." && seg !== ".."),
    form: "a relative path without '..', '.' or empty segments",
  },
  [F.LABEL_KEY]: {
    test: (v) => /^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$/.test(v),
    form: "a label key: 1-63 characters [a-z0-9._/-]",
  },
};
