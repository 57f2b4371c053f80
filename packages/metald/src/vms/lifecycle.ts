import { FailedPreconditionError } from "@kiln/kit";

/**
 * The VM state table (as Firecracker's controllers decide per phase): which verb is legal in
 * which state, and where it leads. The manager checks here before any backend is called, so an
 * illegal request answers `failed_precondition` naming the current state.
 *
 *   CreateVm ──► CREATED ──boot──► RUNNING ⇄ PAUSED
 *                   ▲                │ (reboot: RUNNING → RUNNING)
 *                   └───boot─── SHUTDOWN ◄──shutdown── RUNNING | PAUSED
 *   FAILED: creation or boot failed, or the VM's process died; only delete (or boot again).
 *   delete: from any state.
 */
export const VM_STATES = ["created", "running", "paused", "shutdown", "failed"] as const;
export type VmState = (typeof VM_STATES)[number];

export type VmVerb = "boot" | "pause" | "resume" | "reboot" | "shutdown" | "delete";

const TABLE: Record<VmVerb, { from: readonly VmState[]; to: VmState | "deleted" }> = {
  boot: { from: ["created", "shutdown", "failed"], to: "running" },
  pause: { from: ["running"], to: "paused" },
  resume: { from: ["paused"], to: "running" },
  reboot: { from: ["running"], to: "running" },
  shutdown: { from: ["running", "paused"], to: "shutdown" },
  delete: { from: VM_STATES, to: "deleted" },
};

export class InvalidTransitionError extends FailedPreconditionError {
  constructor(
    readonly vmId: string,
    readonly state: VmState,
    readonly verb: VmVerb,
  ) {
    const allowed = TABLE[verb].from.map((s) => s.toUpperCase()).join(" or ");
    super(`cannot ${verb} VM ${vmId}: it is ${state.toUpperCase()} (${verb} needs ${allowed})`);
  }
}

/** The state `verb` leads to from `state`, or InvalidTransitionError. */
export function transition(vmId: string, state: VmState, verb: VmVerb): VmState | "deleted" {
  const rule = TABLE[verb];
  if (!rule.from.includes(state)) throw new InvalidTransitionError(vmId, state, verb);
  return rule.to;
}

export function canDo(state: VmState, verb: VmVerb): boolean {
  return TABLE[verb].from.includes(state);
}
