import { toJson } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { createVmClient, metald } from "@kiln/api";
import { Command } from "commander";
import { contextOf } from "../client.js";
import { printJson, printRows } from "../output.js";

const STATE = (s: metald.VmState) => metald.VmState[s] ?? "UNKNOWN";
const client = (cmd: Command) => {
  const ctx = contextOf(cmd);
  return { ctx, vms: createVmClient(ctx.transport("metald")) };
};

export function endpointText(vm: Pick<metald.VmInfo, "endpoint">): string {
  const e = vm.endpoint;
  if (!e) return "";
  return e.ports.map((p) => `${e.host}:${p.hostPort}→${p.containerPort}/${p.protocol}`).join(", ");
}

export function printVm(vm: metald.VmInfo): void {
  const rows: Array<[string, string]> = [
    ["vm", vm.vmId],
    ["state", STATE(vm.state)],
    [
      "backend",
      `${vm.backendInfo?.backend ?? ""}${vm.backendInfo?.pid ? ` (pid ${vm.backendInfo.pid})` : ""}`,
    ],
    ["endpoint", endpointText(vm) || "(no ports)"],
    ["address", vm.endpoint?.ipAddress ?? ""],
    ["rootfs", vm.config?.rootfsAssetId ?? ""],
  ];
  if (vm.metrics) {
    const m = vm.metrics;
    rows.push(["cpu", `${(Number(m.cpuTimeNanos) / 1e9).toFixed(2)} s`]);
    rows.push([
      "memory",
      `${(Number(m.memoryUsageBytes) / 1048576).toFixed(1)} MiB of ${(Number(m.memoryLimitBytes) / 1048576).toFixed(0)} MiB`,
    ]);
    rows.push(["network", `rx ${m.networkRxBytes} B, tx ${m.networkTxBytes} B`]);
  }
  if (vm.failureReason) rows.push(["reason", vm.failureReason]);
  const w = Math.max(...rows.map(([k]) => k.length));
  process.stdout.write(`${rows.map(([k, v]) => `${k.padEnd(w)}  ${v}`).join("\n")}\n`);
}

function collectEnv(value: string, prev: Record<string, string>): Record<string, string> {
  const eq = value.indexOf("=");
  if (eq <= 0) throw new Error(`--env ${JSON.stringify(value)}: expected KEY=VALUE`);
  return { ...prev, [value.slice(0, eq)]: value.slice(eq + 1) };
}

function parsePort(value: string, prev: metald.PortMapping[] = []) {
  const m = /^(?:(\d+):)?(\d+)(?:\/(tcp|udp))?$/.exec(value);
  if (!m) throw new Error(`--port ${JSON.stringify(value)}: expected [HOST:]CONTAINER[/tcp|udp]`);
  return [
    ...prev,
    {
      hostPort: Number(m[1] ?? 0),
      containerPort: Number(m[2]),
      protocol: m[3] ?? "tcp",
    } as metald.PortMapping,
  ];
}

/** Options shared by `kiln vms create` and `kiln run`. */
export function vmConfigOptions(cmd: Command): Command {
  return cmd
    .option("--backend <name>", "auto, qemu, firecracker, gvisor or runc (default: metald's)")
    .option("--vcpus <n>", "vCPUs", Number, 1)
    .option("--memory <MiB>", "memory in MiB", Number, 256)
    .option(
      "--port <[host:]container[/proto]>",
      "forward a port (default: the image's exposed ports)",
      parsePort,
    )
    .option("--env <KEY=VALUE>", "set an environment variable (repeatable)", collectEnv, {});
}

export interface VmConfigOpts {
  backend?: string;
  vcpus: number;
  memory: number;
  port?: metald.PortMapping[];
  env: Record<string, string>;
}

export function vmConfig(rootfsAssetId: string, o: VmConfigOpts) {
  return {
    rootfsAssetId,
    backend: o.backend ?? "",
    cpu: { vcpuCount: o.vcpus },
    memory: { sizeBytes: BigInt(o.memory) * 1048576n },
    ports: o.port ?? [],
    env: o.env,
  };
}

export function vmsCommand(): Command {
  const cmd = new Command("vms").description("create, drive and inspect VMs (metald)");

  vmConfigOptions(
    cmd
      .command("create")
      .description("create a VM from a ROOTFS asset (not started)")
      .argument("<rootfs-asset>", "asset id"),
  )
    .option("--json", "print JSON")
    .action(async function (this: Command, assetId: string, o: VmConfigOpts) {
      const { ctx, vms } = client(this);
      const res = await vms.createVm({ config: vmConfig(assetId, o) }, ctx.callOptions);
      if (ctx.json) printJson(toJson(metald.CreateVmResponseSchema, res));
      else
        process.stdout.write(
          `vm ${res.vmId} ${STATE(res.state)} ${endpointText(res)} — start it with: kiln vms boot ${res.vmId}\n`,
        );
    });

  const verb = (
    name: string,
    description: string,
    call: (
      c: ReturnType<typeof client>,
      vmId: string,
      o: Record<string, unknown>,
    ) => Promise<{ state?: metald.VmState }>,
    extra?: (c: Command) => Command,
  ) => {
    let sub = cmd
      .command(name)
      .description(description)
      .argument("<vm>", "VM id")
      .option("--json", "print JSON");
    if (extra) sub = extra(sub);
    sub.action(async function (this: Command, vmId: string, o: Record<string, unknown>) {
      const c = client(this);
      const r = await call(c, vmId, o);
      const state = r.state === undefined ? "DELETED" : STATE(r.state);
      if (c.ctx.json) printJson({ vmId, state });
      else process.stdout.write(`vm ${vmId} ${state}\n`);
    });
  };
  verb("boot", "start a CREATED or SHUTDOWN VM", ({ ctx, vms }, vmId) =>
    vms.bootVm({ vmId }, ctx.callOptions),
  );
  verb("pause", "pause a running VM", ({ ctx, vms }, vmId) => vms.pauseVm({ vmId }, ctx.callOptions));
  verb("resume", "resume a paused VM", ({ ctx, vms }, vmId) => vms.resumeVm({ vmId }, ctx.callOptions));
  verb("reboot", "reboot a running VM", ({ ctx, vms }, vmId) => vms.rebootVm({ vmId }, ctx.callOptions));
  verb(
    "stop",
    "shut a VM down (graceful, forced after the timeout)",
    ({ ctx, vms }, vmId, o) =>
      vms.shutdownVm(
        { vmId, force: o.force === true, timeoutSeconds: Number(o.timeout ?? 0) },
        ctx.callOptions,
      ),
    (c) =>
      c.option("--force", "stop at once").option("--timeout <seconds>", "graceful period before forcing"),
  );
  verb("delete", "delete a VM and everything it holds", async ({ ctx, vms }, vmId) => {
    await vms.deleteVm({ vmId }, ctx.callOptions);
    return {};
  });

  cmd
    .command("get")
    .description("one VM: state, endpoint, live metrics")
    .argument("<vm>", "VM id")
    .option("--json", "print JSON")
    .action(async function (this: Command, vmId: string) {
      const { ctx, vms } = client(this);
      const { vm } = await vms.getVmInfo({ vmId }, ctx.callOptions);
      if (ctx.json) printJson(toJson(metald.VmInfoSchema, vm!));
      else printVm(vm!);
    });

  cmd
    .command("list")
    .description("the tenant's VMs")
    .option("--limit <n>", "page size", Number, 50)
    .option("--page-token <token>", "continue from a previous page")
    .option("--json", "print JSON")
    .action(async function (this: Command, o: { limit: number; pageToken?: string }) {
      const { ctx, vms } = client(this);
      const res = await vms.listVms({ pageSize: o.limit, pageToken: o.pageToken ?? "" }, ctx.callOptions);
      if (ctx.json) return printJson(toJson(metald.ListVmsResponseSchema, res));
      printRows(
        res.vms.map((v) => ({
          vm: v.vmId,
          state: STATE(v.state),
          backend: v.backendInfo?.backend ?? "",
          endpoint: endpointText(v),
          created: v.createdAt ? timestampDate(v.createdAt).toISOString() : "",
          reason: v.failureReason,
        })),
        {
          columns: [
            { key: "vm", header: "VM" },
            { key: "state", header: "STATE" },
            { key: "backend", header: "BACKEND" },
            { key: "endpoint", header: "ENDPOINT" },
            { key: "created", header: "CREATED" },
            { key: "reason", header: "REASON" },
          ],
        },
      );
    });

  cmd
    .command("logs")
    .description("a VM's console; with -f, follow it while the VM runs")
    .argument("<vm>", "VM id")
    .option("-f, --follow", "follow")
    .option("--tail <lines>", "only the last N lines", Number, 0)
    .option("--json", "print one JSON object per line")
    .action(async function (this: Command, vmId: string, o: { follow?: boolean; tail: number }) {
      const { ctx, vms } = client(this);
      for await (const m of vms.streamVmLogs(
        { vmId, follow: o.follow === true, tailLines: o.tail },
        ctx.callOptions,
      )) {
        process.stdout.write(
          ctx.json ? `${JSON.stringify(toJson(metald.StreamVmLogsResponseSchema, m))}\n` : `${m.line}\n`,
        );
      }
    });

  cmd
    .command("backends")
    .alias("doctor")
    .description("which VM backends work on this host, and why the others do not")
    .option("--json", "print JSON")
    .action(async function (this: Command) {
      const { ctx, vms } = client(this);
      const res = await vms.listBackends({}, ctx.callOptions);
      if (ctx.json) return printJson(toJson(metald.ListBackendsResponseSchema, res));
      printRows(
        res.backends.map((b) => ({
          backend: b.name + (b.name === res.autoBackend ? " (auto)" : ""),
          works: b.available ? "yes" : "no",
          isolation: metald.IsolationLevel[b.isolationLevel] ?? "",
          kvm: b.available && b.accelerated ? "yes" : "no",
          detail: b.reason,
        })),
        {
          columns: [
            { key: "backend", header: "BACKEND" },
            { key: "works", header: "WORKS" },
            { key: "isolation", header: "ISOLATION" },
            { key: "kvm", header: "KVM" },
            { key: "detail", header: "DETAIL" },
          ],
        },
      );
    });

  return cmd;
}
