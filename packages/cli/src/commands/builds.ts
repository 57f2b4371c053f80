import { toJson } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { builderd, createBuilderClient } from "@kiln/api";
import { Command } from "commander";
import { contextOf } from "../client.js";
import { printJson, printRows } from "../output.js";
import { buildRows, followBuild, printBuild, STATE } from "./build.js";

const client = (cmd: Command) => {
  const ctx = contextOf(cmd);
  return { ctx, builder: createBuilderClient(ctx.transport("builderd")) };
};

function parseState(s: string): builderd.BuildState {
  const v = builderd.BuildState[s.toUpperCase() as keyof typeof builderd.BuildState];
  if (typeof v !== "number" || v === 0) throw new Error(`--state ${JSON.stringify(s)}: not a build state`);
  return v;
}

export function buildsCommand(): Command {
  const cmd = new Command("builds").description("list, inspect, follow, cancel and delete builds");

  cmd
    .command("list")
    .description("the tenant's builds, newest first")
    .option("--state <state...>", "only builds in these states (e.g. completed failed)")
    .option("--limit <n>", "page size", Number, 50)
    .option("--page-token <token>", "continue from a previous page")
    .option("--json", "print JSON")
    .action(async function (this: Command, opts: { state?: string[]; limit: number; pageToken?: string }) {
      const { ctx, builder } = client(this);
      const res = await builder.listBuilds(
        {
          stateFilter: (opts.state ?? []).map(parseState),
          pageSize: opts.limit,
          pageToken: opts.pageToken ?? "",
        },
        ctx.callOptions,
      );
      if (ctx.json) {
        printJson(toJson(builderd.ListBuildsResponseSchema, res));
        return;
      }
      printRows(buildRows(res.builds), {
        columns: [
          { key: "build", header: "BUILD" },
          { key: "state", header: "STATE" },
          { key: "image", header: "IMAGE" },
          { key: "progress", header: "PROGRESS" },
          { key: "created", header: "CREATED" },
          { key: "error", header: "ERROR" },
        ],
      });
      process.stdout.write(
        `${res.builds.length} of ${res.totalCount}${res.nextPageToken ? ` — next page: --page-token ${res.nextPageToken}` : ""}\n`,
      );
    });

  cmd
    .command("get")
    .description("one build")
    .argument("<build>", "build id")
    .option("--json", "print JSON")
    .action(async function (this: Command, buildId: string) {
      const { ctx, builder } = client(this);
      const { build } = await builder.getBuild({ buildId }, ctx.callOptions);
      if (!build) throw new Error(`build ${buildId} not found`);
      if (ctx.json) printJson(toJson(builderd.BuildJobSchema, build));
      else printBuild(build);
    });

  cmd
    .command("logs")
    .description("a build's log; with -f, follow it until the build ends")
    .argument("<build>", "build id")
    .option("-f, --follow", "follow until the build ends")
    .option("--json", "print one JSON object per line")
    .action(async function (this: Command, buildId: string, opts: { follow?: boolean }) {
      const { ctx, builder } = client(this);
      if (opts.follow && !ctx.json) {
        await followBuild(builder, ctx, buildId);
        return;
      }
      for await (const m of builder.streamBuildLogs(
        { buildId, follow: opts.follow === true },
        ctx.callOptions,
      )) {
        if (ctx.json)
          process.stdout.write(`${JSON.stringify(toJson(builderd.StreamBuildLogsResponseSchema, m))}\n`);
        else if (m.entry) {
          const t = m.entry.timestamp ? timestampDate(m.entry.timestamp).toISOString() : "";
          process.stdout.write(`${t} ${m.entry.component.padEnd(8)} ${m.entry.message}\n`);
        }
      }
    });

  cmd
    .command("cancel")
    .description("stop a pending or running build")
    .argument("<build>", "build id")
    .option("--json", "print JSON")
    .action(async function (this: Command, buildId: string) {
      const { ctx, builder } = client(this);
      const r = await builder.cancelBuild({ buildId }, ctx.callOptions);
      if (ctx.json) printJson({ buildId, cancelled: r.success, state: STATE(r.state) });
      else
        process.stdout.write(
          r.success
            ? `build ${buildId} cancelled\n`
            : `build ${buildId} had already ended (${STATE(r.state)})\n`,
        );
    });

  cmd
    .command("delete")
    .description("delete a build and its rootfs (a running build is cancelled first)")
    .argument("<build>", "build id")
    .option("--json", "print JSON")
    .action(async function (this: Command, buildId: string) {
      const { ctx, builder } = client(this);
      const r = await builder.deleteBuild({ buildId }, ctx.callOptions);
      if (ctx.json) printJson({ buildId, deleted: r.success, state: STATE(r.state) });
      else process.stdout.write(`build ${buildId} deleted (was ${STATE(r.state)})\n`);
    });

  cmd
    .command("stats")
    .description("the tenant's build statistics over the last 30 days")
    .option("--json", "print JSON")
    .action(async function (this: Command) {
      const { ctx, builder } = client(this);
      const s = await builder.getBuildStats({}, ctx.callOptions);
      const out = {
        total: s.totalBuilds,
        completed: s.successfulBuilds,
        failed: s.failedBuilds,
        cancelled: s.cancelledBuilds,
        active: s.activeBuilds,
        avgBuildMs: Number(s.avgBuildTimeMs),
        storageBytes: Number(s.totalStorageBytes),
        computeMinutes: Number(s.totalComputeMinutes.toFixed(2)),
      };
      if (ctx.json) printJson(out);
      else printRows([out], { columns: Object.keys(out).map((k) => ({ key: k, header: k.toUpperCase() })) });
    });

  return cmd;
}
