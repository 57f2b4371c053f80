import {
  type DescField,
  type DescMessage,
  type DescOneof,
  getOption,
  hasOption,
  type Message,
} from "@bufbuild/protobuf";
import { type ReflectMessage, reflect } from "@bufbuild/protobuf/reflect";
import { validate } from "@kiln/api";
import { InvalidArgumentError } from "../errors.js";
import { FORMATS } from "./formats.js";

type FieldRules = validate.FieldRules;

export interface Violation {
  /** Proto field path, e.g. `config.source.docker_image.image_uri` or `env["1X"]`. */
  field: string;
  message: string;
}

/**
 * Checks a message against the kiln.validate.v1 rules declared in its .proto, recursing into
 * nested messages, lists and maps. Returns every violation (empty when valid).
 */
export function violations(schema: DescMessage, message: Message): Violation[] {
  const out: Violation[] = [];
  checkMessage(reflect(schema, message), "", out, 0);
  return out;
}

/** Throws InvalidArgumentError naming the first offending field (and listing the rest). */
export function assertValid(schema: DescMessage, message: Message): void {
  const found = violations(schema, message);
  if (found.length === 0) return;
  const detail = found.map((v) => `${v.field}: ${v.message}`).join("; ");
  throw new InvalidArgumentError(`invalid ${schema.name}: ${detail}`, { field: found[0]!.field });
}

const MAX_DEPTH = 32;

function join(prefix: string, name: string): string {
  return prefix === "" ? name : `${prefix}.${name}`;
}

/**
 * Rules decoded once per descriptor: `getOption` parses the options' extension bytes on every
 * call, which made validation a visible per-message cost (every chunk of a client stream).
 */
const fieldRules = new WeakMap<DescField, FieldRules | null>();
const requiredOneofs = new WeakMap<DescOneof, boolean>();

function rulesOf(field: DescField): FieldRules | undefined {
  let rules = fieldRules.get(field);
  if (rules === undefined) {
    rules = hasOption(field, validate.field) ? getOption(field, validate.field) : null;
    fieldRules.set(field, rules);
  }
  return rules ?? undefined;
}

function oneofRequired(oneof: DescOneof): boolean {
  let required = requiredOneofs.get(oneof);
  if (required === undefined) {
    required = hasOption(oneof, validate.oneof) && getOption(oneof, validate.oneof).required;
    requiredOneofs.set(oneof, required);
  }
  return required;
}

function checkMessage(msg: ReflectMessage, path: string, out: Violation[], depth: number): void {
  if (depth > MAX_DEPTH) return;
  for (const oneof of msg.oneofs) {
    if (oneofRequired(oneof) && !msg.oneofCase(oneof)) {
      const names = oneof.fields.map((f) => f.name).join(", ");
      out.push({ field: join(path, oneof.name), message: `one of ${names} is required` });
    }
  }
  for (const field of msg.fields) {
    const rules = rulesOf(field);
    if (rules?.ignore) continue;
    checkField(msg, field, rules, join(path, field.name), out, depth);
  }
}

function checkField(
  msg: ReflectMessage,
  field: DescField,
  rules: FieldRules | undefined,
  path: string,
  out: Violation[],
  depth: number,
): void {
  const set = msg.isSet(field);
  switch (field.fieldKind) {
    case "message": {
      if (!set) {
        if (rules?.required) out.push({ field: path, message: "is required" });
        return;
      }
      checkMessage(msg.get(field) as ReflectMessage, path, out, depth + 1);
      return;
    }
    case "list": {
      const list = msg.get(field);
      if (rules) checkCount(list.size, rules, path, out);
      for (let i = 0; i < list.size; i++) {
        const item = list.get(i);
        const itemPath = `${path}[${i}]`;
        if (field.listKind === "message") checkMessage(item as ReflectMessage, itemPath, out, depth + 1);
        else if (rules?.items) checkValue(item, field, rules.items, itemPath, out);
      }
      return;
    }
    case "map": {
      const map = msg.get(field);
      if (rules) checkCount(map.size, rules, path, out);
      for (const [key, value] of map.entries()) {
        const itemPath = `${path}[${JSON.stringify(String(key))}]`;
        if (rules?.keys) checkScalarOrString(key, rules.keys, `${itemPath} (key)`, out);
        if (field.mapKind === "message") checkMessage(value as ReflectMessage, itemPath, out, depth + 1);
        else if (rules?.items) checkValue(value, field, rules.items, itemPath, out);
      }
      return;
    }
    default: {
      if (!rules) return;
      const value = msg.get(field);
      if (!set || isZero(value)) {
        // Unset or zero proto3 scalars: only `required` applies (other rules describe real values).
        if (rules.required) out.push({ field: path, message: "is required" });
        return;
      }
      checkValue(value, field, rules, path, out);
    }
  }
}

function isZero(v: unknown): boolean {
  return v === "" || v === 0 || v === 0n || v === false || (v instanceof Uint8Array && v.length === 0);
}

function checkCount(size: number, rules: FieldRules, path: string, out: Violation[]): void {
  if (rules.required && size === 0) out.push({ field: path, message: "must not be empty" });
  if (rules.minItems !== undefined && size < rules.minItems)
    out.push({ field: path, message: `needs at least ${rules.minItems} entries` });
  if (rules.maxItems !== undefined && size > rules.maxItems)
    out.push({ field: path, message: `allows at most ${rules.maxItems} entries` });
}

function checkValue(
  value: unknown,
  field: DescField,
  rules: FieldRules,
  path: string,
  out: Violation[],
): void {
  const enumDesc =
    field.fieldKind === "enum"
      ? field.enum
      : field.fieldKind === "list" || field.fieldKind === "map"
        ? (field.enum ?? undefined)
        : undefined;
  if (enumDesc && typeof value === "number") {
    if (rules.required && value === 0) out.push({ field: path, message: "is required" });
    if ((rules.definedOnly || rules.required) && !enumDesc.values.some((v) => v.number === value))
      out.push({ field: path, message: `${value} is not a value of ${enumDesc.typeName}` });
    return;
  }
  checkScalarOrString(value, rules, path, out);
}

function checkScalarOrString(value: unknown, rules: FieldRules, path: string, out: Violation[]): void {
  if (typeof value === "string" || value instanceof Uint8Array) {
    const len = typeof value === "string" ? [...value].length : value.length;
    const unit = typeof value === "string" ? "characters" : "bytes";
    if (rules.required && len === 0) out.push({ field: path, message: "is required" });
    if (rules.minLen !== undefined && len < rules.minLen)
      out.push({ field: path, message: `must be at least ${rules.minLen} ${unit}` });
    if (rules.maxLen !== undefined && len > rules.maxLen)
      out.push({ field: path, message: `must be at most ${rules.maxLen} ${unit}` });
    if (typeof value === "string" && value !== "") {
      if (rules.pattern !== undefined && !patternOf(rules.pattern).test(value))
        out.push({ field: path, message: `must match ${rules.pattern}` });
      if (rules.format !== validate.Format.UNSPECIFIED) {
        const f = FORMATS[rules.format as keyof typeof FORMATS];
        if (f && !f.test(value))
          out.push({ field: path, message: `${JSON.stringify(clip(value))} is not ${f.form}` });
      }
      if (rules.in.length > 0 && !rules.in.includes(value))
        out.push({ field: path, message: `must be one of ${rules.in.join(", ")}` });
    }
    return;
  }
  if (typeof value === "number" || typeof value === "bigint") {
    const n = Number(value);
    if (rules.required && n === 0) out.push({ field: path, message: "is required" });
    if (rules.gte !== undefined && n < rules.gte)
      out.push({ field: path, message: `must be >= ${rules.gte}` });
    if (rules.lte !== undefined && n > rules.lte)
      out.push({ field: path, message: `must be <= ${rules.lte}` });
  }
}

/** Patterns come from the .proto files, so this cache is bounded by the rules declared. */
const patterns = new Map<string, RegExp>();

function patternOf(pattern: string): RegExp {
  let re = patterns.get(pattern);
  if (!re) {
    re = new RegExp(`^(?:${pattern})$`);
    patterns.set(pattern, re);
  }
  return re;
}

function clip(s: string): string {
  return s.length > 80 ? `${s.slice(0, 77)}...` : s;
}
