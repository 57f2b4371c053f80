import { bool, type ConfigSpec, int, list, oneOf, str } from "@kiln/kit";

const HOST_PORT = /^[A-Za-z0-9.-]+(:\d{1,5})?$|^\[[0-9a-fA-F:]+\](:\d{1,5})?$/;

/** builderd's own settings (`UNKEY_BUILDERD_*`), next to the common ones every service has. */
export const settings = {
  insecureRegistries: list({
    default: [],
    item: HOST_PORT,
    form: "a comma-separated list of host[:port]",
    doc: "Registries builds may reach over plain HTTP and on loopback/private addresses (e.g. a local registry at 127.0.0.1:5000). Every other registry must use HTTPS and resolve to a public address.",
  }),
  localImageDirs: list({
    default: [],
    item: /^\//,
    form: "a comma-separated list of absolute directories",
    doc: "Directories oci:, oci-archive: and docker-archive: sources may read from. Empty: local sources are refused.",
  }),
  registerAssets: bool({
    default: true,
    doc: "Register every finished rootfs with assetmanagerd (which then owns the file). false: keep it as a local file in the build directory (builderd without assetmanagerd).",
  }),
  maxConcurrentBuilds: int({
    default: 2,
    min: 1,
    max: 256,
    doc: "Builds running at once on this builderd (all tenants); more wait as PENDING.",
  }),
  layerDownloadConcurrency: int({
    default: 4,
    min: 1,
    max: 32,
    doc: "Layers of one image downloaded at once.",
  }),
  ext4Writer: oneOf(["kiln", "mkfs"] as const, {
    default: "kiln",
    doc: "What makes the ext4 image. kiln: layers' file content goes straight into the image while they are extracted and Kiln's writer adds the metadata (content is written once). mkfs: the tree is extracted in full and `mkfs.ext4 -d` copies it into the image (needs e2fsprogs).",
  }),
  treeDir: str({
    default: "auto",
    pattern: /^(auto|build|\/.*)$/,
    form: '"auto", "build" or an absolute directory',
    doc: "Where extracted trees are assembled when Kiln's ext4 writer makes the image (the tree then holds no file content, only its shape: ~4 KiB per file on a tmpfs). auto: on the tmpfs at /dev/shm when there is one with 512 MiB free (file creates there are ~100x cheaper than on a disk), else in the build dir; a build starting with less free uses its build dir. build: in the build dir. A directory: under it. With ext4Writer=mkfs the tree holds the content and stays in the build dir.",
  }),
  tiniPath: str({
    default: "/usr/bin/tini-static",
    doc: "Static tini injected as the VM init's PID 1 (Debian package tini).",
  }),
  busyboxPath: str({
    default: "/bin/busybox",
    doc: "Static busybox injected for the VM init's shell (Debian package busybox-static).",
  }),
} satisfies ConfigSpec;
