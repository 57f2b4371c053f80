import { builderd, createBuilderClient, createVmClient } from "@kiln/api";
import { Command } from "commander";
import { contextOf } from "../client.js";
import { printJson } from "../output.js";
import { followBuild } from "./build.js";
import { endpointText, type VmConfigOpts, vmConfig, vmConfigOptions } from "./vms.js";

/**
 * `kiln run IMAGE`: build (or reuse) the rootfs, create and boot a VM, wait until its first
 * port answers, print the endpoint — Kiln's main job in one line.
 */
export function runCommand(): Command {
  return vmConfigOptions(
    new Command("run")
      .description(
        "build an image (or reuse its rootfs), boot it as a VM and print its endpoint once it answers",
      )
      .argument("<image>", "image reference, e.g. docker://127.0.0.1:5000/app:1"),
  )
    .option("--wait <seconds>", "how long to wait for the port to answer", Number, 120)
    .option("--json", "print JSON")
    .action(async function (this: Command, image: string, o: VmConfigOpts & { wait: number }) {
      const ctx = contextOf(this);
      const builds = createBuilderClient(ctx.transport("builderd"));
      const vms = createVmClient(ctx.transport("metald"));
      const say = (s: string) => !ctx.json && process.stderr.write(`${s}\n`);

      const { buildId } = await builds.createBuild(
        { config: { source: { sourceType: { case: "dockerImage", value: { imageUri: image } } } } },
        ctx.callOptions,
      );
      const build = await followBuild(builds, ctx, buildId, { printResult: false });
      if (build.state !== builderd.BuildState.COMPLETED) {
        throw new Error(`build ${buildId} ${builderd.BuildState[build.state]}: ${build.errorMessage}`);
      }
      say(`rootfs ${build.assetId} (${build.currentStep})`);
      const vm = await vms.createVm({ config: vmConfig(build.assetId, o) }, ctx.callOptions);
      say(`vm ${vm.vmId} created; booting`);
      await vms.bootVm({ vmId: vm.vmId }, ctx.callOptions);
      const port = vm.endpoint?.ports[0];
      if (port) {
        const url = `http://${vm.endpoint!.host}:${port.hostPort}/`;
        const deadline = Date.now() + o.wait * 1000;
        let answered = false;
        while (!answered && Date.now() < deadline) {
          answered = await fetch(url, { signal: AbortSignal.timeout(1_000) }).then(
            () => true,
            () => false,
          );
          if (!answered) await new Promise((r) => setTimeout(r, 250));
        }
        if (!answered)
          throw new Error(
            `vm ${vm.vmId} is running but ${url} did not answer within ${o.wait}s; see kiln vms logs ${vm.vmId}`,
          );
      }
      if (ctx.json) printJson({ vmId: vm.vmId, buildId, assetId: build.assetId, endpoint: endpointText(vm) });
      else
        process.stdout.write(
          `${vm.vmId} is up: ${port ? `http://${vm.endpoint!.host}:${port.hostPort}/` : "(no ports exposed)"}\n`,
        );
    });
}
