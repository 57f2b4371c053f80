import os from "node:os";
import path from "node:path";
import { VmService } from "@kiln/api";
import { defineService, tierLimits } from "@kiln/kit";
import type { Kysely } from "kysely";
import { releaseLingeringImages } from "./backends/shared-images.js";
import { createCgroupManager } from "./cgroups/cgroup.js";
import { settings } from "./config.js";
import { createSampler } from "./metering/sampler.js";
import { createUsageForwarder } from "./metering/usage-forwarder.js";
import { createMetaldMetrics } from "./metrics.js";
import { migrations } from "./migrations.js";
import { createNetworkAttacher, DEFAULT_NETNS_PREFIX } from "./network/attach.js";
import { createNamespacePool } from "./network/netns-pool.js";
import { addressLayout, createAddressPool, createPortPool, parsePortRange } from "./network/pool.js";
import { createPortForwarder } from "./network/port-forward.js";
import { createRouter } from "./network/router.js";
import { createVmService } from "./service.js";
import { createVmAssets } from "./vms/assets.js";
import { createBackendRegistry } from "./vms/backends.js";
import { trimConsoleLog } from "./vms/console.js";
import { createDeployments } from "./vms/deployments.js";
import { createHostKernel } from "./vms/host-kernel.js";
import { createVmManager } from "./vms/manager.js";
import { createVmStore, type MetaldDb } from "./vms/store.js";

/** metald: VMs of one host: lifecycle, networking, cgroups, 100 ms sampling. */
export const metald = defineService({
  name: "metald",
  summary: "VMs of one host: lifecycle, networking, cgroups, 100 ms sampling",
  settings,
  peers: ["assetmanagerd", "billaged"],
  migrations,
  async create({ config, db, dataDir, log, metrics, peers }) {
    const kdb = db.db as Kysely<MetaldDb>;
    let networkError: string | undefined;
    const store = createVmStore(kdb);
    const vmRoot = config.vmRoot || path.join(dataDir, "vms");
    const router = createRouter({
      name: config.routerName,
      uplinkName: config.routerName === "kiln-router" ? "kiln-uplink" : `${config.routerName}-up`,
      layout: addressLayout(config.networkCidr),
      blockedCidrs: config.egressBlockedCidrs,
    });
    const forwarder = createPortForwarder({ bindAddresses: [config.bindAddress], logger: log });
    const usage = config.billagedEnabled
      ? createUsageForwarder({
          transport: peers.billaged!,
          instanceId: os.hostname(),
          batchIntervalMs: config.usageBatchInterval,
          log,
        })
      : undefined;
    const sampler = createSampler({ logger: log, onSample: usage ? (s) => usage.sample(s) : undefined });
    const linger = { imageMountLingerMs: config.imageMountLinger };
    const backends = await createBackendRegistry({ runc: linger, gvisor: linger });
    const m = createMetaldMetrics(metrics, () => store.countByStateAndBackend());
    const vms = createVmManager({
      store,
      backends,
      assets: createVmAssets(peers.assetmanagerd!),
      hostKernel: createHostKernel(path.join(dataDir, "kernels")),
      network: {
        router,
        attacher: createNetworkAttacher({
          router,
          pool: createAddressPool({ db: kdb, cidr: config.networkCidr }),
          namespaces: createNamespacePool({
            db: kdb,
            router,
            netnsPrefix: DEFAULT_NETNS_PREFIX,
            size: config.netnsPoolSize,
            log,
          }),
        }),
        ports: createPortPool({
          db: kdb,
          range: parsePortRange(config.portRange, "UNKEY_METALD_PORT_RANGE"),
        }),
        forwarder,
        unavailable: () => networkError,
      },
      cgroups: createCgroupManager(),
      sampler,
      limits: tierLimits(),
      events: usage && {
        started: (vm) => usage.started(vm),
        adopted: (vm) => usage.adopted(vm),
        stopped: (vm) => void usage.stopped(vm),
      },
      settings: {
        vmRoot,
        endpointHost: config.bindAddress === "0.0.0.0" ? "127.0.0.1" : config.bindAddress,
        shutdownTimeoutMs: config.shutdownGrace,
        defaultBackend: config.backend,
      },
      metrics: m,
      log,
    });
    const deployments = createDeployments({ store, vms, log });
    let trimTimer: NodeJS.Timeout | undefined;
    return {
      routes(r) {
        r.service(VmService, createVmService({ vms, deployments, backends }));
      },
      readiness: [
        {
          name: "network",
          async check() {
            if (networkError) throw new Error(networkError);
          },
        },
      ],
      async start() {
        try {
          const { adopted, lost } = await vms.recover();
          if (adopted + lost > 0) log.info({ adopted, lost }, "VMs recovered after restart");
        } catch (err) {
          // Without the router (not root, no ip/iptables) VMs cannot be created; say so in
          // readiness instead of refusing to start the API.
          networkError = `VM networking unavailable: ${err instanceof Error ? err.message : String(err)}`;
          log.error({ err }, networkError);
        }
        sampler.start();
        usage?.start();
        trimTimer = setInterval(() => {
          void (async () => {
            for (const row of await store.all()) {
              await trimConsoleLog(
                path.join(vmRoot, row.vm_id, "console.log"),
                config.consoleLogMaxBytes,
              ).catch(() => {});
            }
          })();
        }, 10_000);
        trimTimer.unref();
      },
      async stop() {
        clearInterval(trimTimer);
        await vms.stop();
        await usage?.stop();
        await releaseLingeringImages();
      },
    };
  },
});
