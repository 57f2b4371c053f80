import { type Logger, randomIdChars } from "@kiln/kit";
import type { Kysely } from "kysely";
import { networkNamesOf } from "./names.js";
import { deleteVmNamespace, prepareVmNamespace } from "./netns.js";
import type { Router } from "./router.js";

/**
 * VM namespaces made ahead of time. Making a namespace and its veth pair is the slowest part of
 * CreateVm's network (two `ip` processes in a row, and the kernel's own work for a new network
 * stack); a pooled one leaves only the VM's address and routes to configure.
 *
 * Namespace names derive from the VM id (names.ts), so a pool entry is a short id that the next
 * VM's id ends with: `take()` hands it to the VM id being made, and the attacher `claim()`s it
 * when it wires that VM. Entries are rows in `netns_pool` before their namespace exists, so after
 * a crash start() removes the namespaces no VM took; an entry that a VM did take is left alone.
 */
export interface NamespacePoolTables {
  netns_pool: { short_id: string; created_at: number };
}

export interface NamespacePool {
  /** How many ready namespaces the pool keeps. */
  readonly size: number;
  readonly netnsPrefix: string;
  readonly router: Router;
  /** A ready namespace's short id, to end the next VM id with; undefined when none is ready. */
  take(): string | undefined;
  /** True once for a short id handed out by take(): its namespace is ready and unused. */
  claim(short: string): boolean;
  /** Removes entries an earlier run left unused (`inUse`: short ids of existing VMs), then fills. */
  start(inUse: ReadonlySet<string>): Promise<void>;
  /** Stops refilling and removes the ready namespaces. */
  stop(): Promise<void>;
  /** Short ids of the ready namespaces (leak checks leave them out). */
  idle(): string[];
  /** Resolves when the current refill is done (tests). */
  settled(): Promise<void>;
}

export interface NamespacePoolDeps<DB extends NamespacePoolTables = NamespacePoolTables> {
  db: Kysely<DB>;
  router: Router;
  netnsPrefix: string;
  size: number;
  /**
   * Quiet time after the last take() before refilling (default 1 s), so the refill does not compete
   * with the VMs being created and booted: a burst drains the pool and refills after it.
   */
  refillDelayMs?: number;
  log: Logger;
  now?: () => number;
}

export function createNamespacePool<DB extends NamespacePoolTables>(
  deps: NamespacePoolDeps<DB>,
): NamespacePool {
  const db = deps.db as unknown as Kysely<NamespacePoolTables>;
  const { router, netnsPrefix, size, log } = deps;
  const now = deps.now ?? Date.now;
  const refillDelayMs = deps.refillDelayMs ?? 1_000;
  const ready: string[] = [];
  const taken = new Set<string>();
  let running = false;
  let filling: Promise<void> = Promise.resolve();
  let timer: NodeJS.Timeout | undefined;
  const names = (short: string) => networkNamesOf(short, netnsPrefix);

  async function remove(short: string): Promise<void> {
    await deleteVmNamespace(router, names(short));
    await forget(short);
  }

  async function forget(short: string): Promise<void> {
    await db.deleteFrom("netns_pool").where("short_id", "=", short).execute();
  }

  /** Makes namespaces until `size` are ready; one at a time, in the background. */
  function refill(): Promise<void> {
    filling = filling.then(async () => {
      while (running && ready.length < size) {
        const short = randomIdChars(12);
        try {
          await db.insertInto("netns_pool").values({ short_id: short, created_at: now() }).execute();
          await prepareVmNamespace(router, names(short));
        } catch (err) {
          // CreateVm makes its namespace itself meanwhile; the next take() tries again.
          log.warn({ err }, "could not make a VM network namespace ahead of time");
          await remove(short).catch(() => undefined);
          return;
        }
        if (running) ready.push(short);
        else await remove(short).catch(() => undefined);
      }
    });
    return filling;
  }

  return {
    size,
    netnsPrefix,
    router,
    take() {
      const short = ready.shift();
      if (short === undefined) return undefined;
      taken.add(short);
      clearTimeout(timer);
      timer = setTimeout(() => void refill(), refillDelayMs);
      timer.unref();
      return short;
    },
    claim(short) {
      if (!taken.delete(short)) return false;
      // The VM's row names it now; a row left by a crash here is cleaned up by start().
      forget(short).catch((err) => log.warn({ err, short }, "could not drop a used pool entry"));
      return true;
    },
    async start(inUse) {
      for (const { short_id } of await db.selectFrom("netns_pool").select("short_id").execute()) {
        await (inUse.has(short_id) ? forget(short_id) : remove(short_id)).catch((err) =>
          log.warn({ err, short: short_id }, "could not remove a VM network namespace left in the pool"),
        );
      }
      running = size > 0;
      void refill();
    },
    async stop() {
      running = false;
      clearTimeout(timer);
      await filling;
      for (const short of ready.splice(0))
        await remove(short).catch((err) => log.warn({ err }, "pool cleanup"));
    },
    idle: () => [...ready],
    settled: () => filling,
  };
}
