import { toJson } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { type BuilderClient, builderd, common, createBuilderClient } from "@kiln/api";
import cliProgress from "cli-progress";
import { Command, Option } from "commander";
import { type CliContext, contextOf } from "../client.js";
import { printJson, printRows } from "../output.js";

const STATE = (s: builderd.BuildState) => builderd.BuildState[s] ?? "UNKNOWN";

export function buildCommand(): Command {
  return new Command("build")
    .description(
      "build a microVM rootfs from a container image (docker://, oci:, oci-archive:, docker-archive:)",
    )
    .argument("<image>", "image reference, e.g. docker://127.0.0.1:5000/app:1 or alpine:3.20")
    .option("-f, --follow", "follow progress and logs until the build ends")
    .option("--username <user>", "registry username (password from $KILN_REGISTRY_PASSWORD)")
    .option("--env <KEY=VALUE...>", "environment variables added to the image's", collectEnv, {})
    .option("--entrypoint <cmd...>", "override the image's entrypoint")
    .option("--cmd <arg...>", "override the image's command")
    .option("--port <port...>", "expose ports besides the image's (e.g. 8080/tcp)")
    .option("--remove-docs", "remove documentation from the rootfs")
    .option("--remove-cache", "remove package caches from the rootfs")
    .option("--timeout <seconds>", "fail the build after this many seconds (capped by the tier)", Number, 0)
    .addOption(new Option("--idempotency-key <key>", "return the earlier build started with this key"))
    .option("--json", "print JSON")
    .action(async function (this: Command, image: string, opts: BuildOpts) {
      const ctx = contextOf(this);
      const client = createBuilderClient(ctx.transport("builderd"));
      const password = process.env.KILN_REGISTRY_PASSWORD;
      const res = await client.createBuild(
        {
          idempotencyKey: opts.idempotencyKey ?? "",
          config: {
            source: {
              sourceType: {
                case: "dockerImage",
                value: {
                  imageUri: image,
                  auth: opts.username ? { username: opts.username, password: password ?? "" } : undefined,
                },
              },
            },
            timeoutSeconds: opts.timeout,
            target: {
              targetType: {
                case: "microvmRootfs",
                value: {
                  runtimeConfig: {
                    environment: opts.env,
                    entrypoint: opts.entrypoint ?? [],
                    command: opts.cmd ?? [],
                    exposedPorts: opts.port ?? [],
                  },
                  optimization: {
                    removeDocs: opts.removeDocs === true,
                    removeCache: opts.removeCache === true,
                  },
                },
              },
            },
          },
        },
        ctx.callOptions,
      );
      if (!opts.follow) {
        if (ctx.json) printJson({ buildId: res.buildId, state: STATE(res.state) });
        else
          process.stdout.write(
            `build ${res.buildId} ${STATE(res.state)} — follow it with: kiln builds logs -f ${res.buildId}\n`,
          );
        return;
      }
      await followBuild(client, ctx, res.buildId);
    });
}

interface BuildOpts {
  follow?: boolean;
  username?: string;
  env: Record<string, string>;
  entrypoint?: string[];
  cmd?: string[];
  port?: string[];
  removeDocs?: boolean;
  removeCache?: boolean;
  timeout: number;
  idempotencyKey?: string;
}

function collectEnv(value: string, prev: Record<string, string>): Record<string, string> {
  const eq = value.indexOf("=");
  if (eq <= 0) throw new Error(`--env ${JSON.stringify(value)}: expected KEY=VALUE`);
  return { ...prev, [value.slice(0, eq)]: value.slice(eq + 1) };
}

const MiB = 1024 * 1024;

/**
 * Streams a build's logs and progress until it ends: a progress bar for bytes pulled on a
 * terminal, plain lines otherwise; then the result. Exit code 1 when the build did not complete.
 */
export async function followBuild(
  client: BuilderClient,
  ctx: CliContext,
  buildId: string,
  opts: { printResult?: boolean } = {},
): Promise<builderd.BuildJob> {
  const tty = process.stderr.isTTY && !ctx.json;
  let bar: cliProgress.SingleBar | undefined;
  const stopBar = () => {
    bar?.stop();
    bar = undefined;
  };
  for await (const m of client.streamBuildLogs({ buildId, follow: true }, ctx.callOptions)) {
    if (m.entry && !ctx.json) {
      const line = `${timestampDate(m.entry.timestamp!).toISOString().slice(11, 19)} ${m.entry.component.padEnd(8)} ${m.entry.message}`;
      if (bar) bar.update({ line });
      else process.stderr.write(`${m.entry.level === common.LogLevel.ERROR ? "✗ " : ""}${line}\n`);
    }
    const p = m.progress;
    if (p && tty && p.stage === builderd.BuildState.PULLING && p.bytesTotal > 0n) {
      if (!bar) {
        bar = new cliProgress.SingleBar(
          {
            format: "pulling [{bar}] {value}/{total} MiB  layers {layers}",
            hideCursor: true,
            clearOnComplete: true,
          },
          cliProgress.Presets.shades_classic,
        );
        bar.start(Math.ceil(Number(p.bytesTotal) / MiB), 0, { layers: "" });
      }
      bar.update(Math.floor(Number(p.bytesDone) / MiB), { layers: `${p.layersDone}/${p.layersTotal}` });
    } else if (p && p.stage !== builderd.BuildState.PULLING) {
      stopBar();
    }
  }
  stopBar();
  const { build } = await client.getBuild({ buildId }, ctx.callOptions);
  if (!build) throw new Error(`build ${buildId} vanished`);
  if (opts.printResult !== false) {
    if (ctx.json) printJson(toJson(builderd.BuildJobSchema, build));
    else printBuild(build);
    if (build.state !== builderd.BuildState.COMPLETED) process.exitCode = 1;
  }
  return build;
}

export function printBuild(b: builderd.BuildJob): void {
  const rows: Array<[string, string]> = [
    ["build", b.buildId],
    ["state", STATE(b.state)],
    ["image", b.imageMetadata?.originalImage || sourceOf(b)],
  ];
  if (b.imageMetadata) rows.push(["digest", b.imageMetadata.imageDigest]);
  if (b.rootfsPath)
    rows.push(["rootfs", `${b.rootfsPath} (${Number(b.rootfsSizeBytes)} bytes, ${b.rootfsChecksum})`]);
  if (b.assetId) rows.push(["asset", b.assetId]);
  if (b.metrics) rows.push(["took", `${Number(b.metrics.totalDurationMs)} ms`]);
  if (b.errorMessage) rows.push(["error", b.errorMessage]);
  if (!b.errorMessage && b.currentStep) rows.push(["step", `${b.currentStep} (${b.progressPercent}%)`]);
  const width = Math.max(...rows.map(([k]) => k.length));
  process.stdout.write(`${rows.map(([k, v]) => `${k.padEnd(width)}  ${v}`).join("\n")}\n`);
}

export function sourceOf(b: builderd.BuildJob): string {
  const s = b.config?.source?.sourceType;
  return s?.case === "dockerImage" ? s.value.imageUri : (s?.case ?? "");
}

export function buildRows(builds: builderd.BuildJob[]) {
  return builds.map((b) => ({
    build: b.buildId,
    state: STATE(b.state),
    image: sourceOf(b),
    progress: `${b.progressPercent}%`,
    created: b.createdAt ? timestampDate(b.createdAt).toISOString() : "",
    error: b.errorMessage,
  }));
}

export { printRows, STATE };
