import path from "node:path";
import { InvalidArgumentError } from "@kiln/kit";

/**
 * Image references as builds name them: `docker://HOST[:PORT]/REPO[:TAG][@sha256:…]`, a bare
 * Docker reference (`alpine`, `ghcr.io/org/app:1`; Docker Hub defaults apply), or a local
 * transport: `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`, `docker-archive:FILE[:REPO:TAG]`.
 * The grammar follows distribution's reference package; only sha256 digests are accepted.
 */
export type Transport = "docker" | "oci" | "oci-archive" | "docker-archive";

export interface ImageRef {
  transport: Transport;
  /** As given. */
  raw: string;
  /** docker: "host[:port]" (docker.io for Docker Hub). docker-archive: the image's registry, when named. */
  registry?: string;
  /** docker: "library/alpine". */
  repository?: string;
  tag?: string;
  digest?: string;
  /** Local transports: absolute file or directory. */
  path?: string;
}

export const DOCKER_HUB = "docker.io";
const MAX_NAME = 255;
const COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const TAG = /^[\w][\w.-]{0,127}$/;
const OCI_TAG = /^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$/;
const DIGEST = /^sha256:[a-f0-9]{64}$/;
const ANY_DIGEST = /^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$/;
const HOST =
  /^(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*|\[[0-9a-fA-F:.]+\])(?::(\d{1,5}))?$/;
/** Transports of other tools (containers/image, Kiln's later sources) that are not image refs here. */
const OTHER_TRANSPORTS = /^(git|archive|docker-daemon|containers-storage|dir|ostree|sif|tarball|file):[/.]/;

function invalid(uri: string, what: string): InvalidArgumentError {
  return new InvalidArgumentError(`invalid image reference ${JSON.stringify(uri)}: ${what}`);
}

export function parseImageRef(uri: string): ImageRef {
  if (typeof uri !== "string" || uri.trim() === "") throw invalid(String(uri), "it is empty");
  if (uri !== uri.trim() || /\s/.test(uri)) throw invalid(uri, "it contains whitespace");
  if (uri.startsWith("docker://")) return parseDocker(uri, uri.slice("docker://".length));
  for (const t of ["oci-archive", "docker-archive", "oci"] as const) {
    if (uri.startsWith(`${t}:`)) return parseLocal(uri, t, uri.slice(t.length + 1));
  }
  const scheme = /^([a-z][a-z0-9+.-]*):\/\//.exec(uri) ?? OTHER_TRANSPORTS.exec(uri);
  if (scheme) {
    throw invalid(
      uri,
      `transport "${scheme[1]}" is not supported; use docker://, oci:, oci-archive: or docker-archive:`,
    );
  }
  return parseDocker(uri, uri);
}

/** A Docker reference without transport prefix: [HOST[:PORT]/]NAME[:TAG][@DIGEST]. */
export function parseDockerReference(
  uri: string,
  rest: string,
): { registry: string; repository: string; tag?: string; digest?: string } {
  if (rest === "") throw invalid(uri, "the repository name is missing");
  let name = rest;
  let digest: string | undefined;
  const at = name.indexOf("@");
  if (at >= 0) {
    digest = name.slice(at + 1);
    name = name.slice(0, at);
    if (!DIGEST.test(digest)) {
      if (ANY_DIGEST.test(digest) && !digest.startsWith("sha256:")) {
        throw invalid(
          uri,
          `digest algorithm "${digest.split(":")[0]}" is not supported; use a sha256 digest`,
        );
      }
      throw invalid(
        uri,
        `"${digest}" is not a digest (expected sha256: followed by 64 lowercase hex digits)`,
      );
    }
  }
  let tag: string | undefined;
  const lastSlash = name.lastIndexOf("/");
  const colon = name.lastIndexOf(":");
  if (colon > lastSlash) {
    tag = name.slice(colon + 1);
    name = name.slice(0, colon);
    if (!TAG.test(tag)) {
      throw invalid(
        uri,
        `tag "${tag}" is not valid (letters, digits, _ . -; at most 128; not starting with . or -)`,
      );
    }
  }
  if (name === "") throw invalid(uri, "the repository name is missing");
  let registry = DOCKER_HUB;
  let repository = name;
  const slash = name.indexOf("/");
  if (slash >= 0) {
    const first = name.slice(0, slash);
    // distribution's rule: the first component is a host when it has a dot or a port, is
    // localhost, or has uppercase letters (which repository names may not).
    if (
      first.includes(".") ||
      first.includes(":") ||
      first === "localhost" ||
      first !== first.toLowerCase()
    ) {
      const m = HOST.exec(first);
      if (!m) throw invalid(uri, `registry host "${first}" is not a valid host[:port]`);
      if (m[1] !== undefined && (Number(m[1]) < 1 || Number(m[1]) > 65535)) {
        throw invalid(uri, `registry port ${m[1]} is out of range`);
      }
      registry = first.toLowerCase() === "index.docker.io" ? DOCKER_HUB : first.toLowerCase();
      repository = name.slice(slash + 1);
    }
  }
  if (repository === "") throw invalid(uri, "the repository name is missing");
  for (const component of repository.split("/")) {
    if (component !== component.toLowerCase()) throw invalid(uri, "the repository name must be lowercase");
    if (!COMPONENT.test(component)) {
      throw invalid(
        uri,
        `repository path component "${component}" is not valid (lowercase letters and digits, separated by . _ __ or -)`,
      );
    }
  }
  if (registry === DOCKER_HUB && !repository.includes("/")) repository = `library/${repository}`;
  if (`${registry}/${repository}`.length > MAX_NAME) {
    throw invalid(uri, `the repository name is longer than ${MAX_NAME} characters`);
  }
  if (tag === undefined && digest === undefined) tag = "latest";
  return {
    registry,
    repository,
    ...(tag !== undefined ? { tag } : {}),
    ...(digest !== undefined ? { digest } : {}),
  };
}

function parseDocker(uri: string, rest: string): ImageRef {
  return { transport: "docker", raw: uri, ...parseDockerReference(uri, rest) };
}

/** `PATH[:REF]`, split at the first ':' as containers/image does (paths may not contain ':'). */
function parseLocal(uri: string, transport: Exclude<Transport, "docker">, rest: string): ImageRef {
  const colon = rest.indexOf(":");
  const file = colon >= 0 ? rest.slice(0, colon) : rest;
  const reference = colon >= 0 ? rest.slice(colon + 1) : undefined;
  if (file === "") throw invalid(uri, `the ${transport}: path is missing`);
  if (!path.isAbsolute(file)) throw invalid(uri, `the ${transport}: path must be absolute`);
  if (file.includes("\0")) throw invalid(uri, "the path contains a NUL byte");
  const ref: ImageRef = { transport, raw: uri, path: path.normalize(file) };
  if (reference === undefined) return ref;
  if (reference === "") throw invalid(uri, `the reference after "${file}:" is empty`);
  if (transport === "docker-archive") {
    const named = parseDockerReference(uri, reference);
    if (named.digest !== undefined)
      throw invalid(uri, "a docker-archive: reference names an image by tag, not digest");
    return { ...ref, ...named };
  }
  if (!OCI_TAG.test(reference)) {
    throw invalid(
      uri,
      `"${reference}" is not a valid ${transport}: tag (letters, digits, _ . + -; at most 128)`,
    );
  }
  return { ...ref, tag: reference };
}

/** Canonical form, e.g. `docker://docker.io/library/alpine:3.20`. */
export function formatImageRef(ref: ImageRef): string {
  const named = (r: ImageRef) =>
    `${r.registry}/${r.repository}${r.tag !== undefined ? `:${r.tag}` : ""}${r.digest !== undefined ? `@${r.digest}` : ""}`;
  switch (ref.transport) {
    case "docker":
      return `docker://${named(ref)}`;
    case "oci":
    case "oci-archive":
      return `${ref.transport}:${ref.path}${ref.tag !== undefined ? `:${ref.tag}` : ""}`;
    case "docker-archive":
      return `docker-archive:${ref.path}${ref.repository !== undefined ? `:${named(ref)}` : ""}`;
  }
}
