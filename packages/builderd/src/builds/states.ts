/**
 * The build state machine (the seeds' states). One table says which state may follow which;
 * the manager moves builds only to a state the table allows (`predecessors`, checked in the
 * same UPDATE that writes the new state).
 *
 *   pending → pulling → extracting → building → optimizing → completed
 *      any active state → failed | cleaning → cancelled
 */
export const BUILD_STATES = [
  "pending",
  "pulling",
  "extracting",
  "building",
  "optimizing",
  "completed",
  "failed",
  "cancelled",
  "cleaning",
] as const;
export type BuildState = (typeof BUILD_STATES)[number];

export const TERMINAL: ReadonlySet<BuildState> = new Set(["completed", "failed", "cancelled"]);
export const ACTIVE: readonly BuildState[] = [
  "pending",
  "pulling",
  "extracting",
  "building",
  "optimizing",
  "cleaning",
];

const NEXT: Record<BuildState, readonly BuildState[]> = {
  pending: ["pulling", "failed", "cleaning", "cancelled", "completed"],
  pulling: ["extracting", "completed", "failed", "cleaning"],
  extracting: ["building", "failed", "cleaning"],
  building: ["optimizing", "failed", "cleaning"],
  optimizing: ["completed", "failed", "cleaning"],
  cleaning: ["cancelled", "failed"],
  completed: [],
  failed: [],
  cancelled: [],
};

export function isTerminal(state: BuildState): boolean {
  return TERMINAL.has(state);
}

export function canTransition(from: BuildState, to: BuildState): boolean {
  return NEXT[from].includes(to);
}

/** The states a build may be in to move to `to`. */
export function predecessors(to: BuildState): BuildState[] {
  return BUILD_STATES.filter((from) => canTransition(from, to));
}
