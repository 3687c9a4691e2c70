import type { Socket } from 'socket.io'
import type { ClientState } from '../client.ts'
import type { BaselineState } from '../baseline-server.ts'
import type { ServerState } from '../server.ts'
import type { Context } from './context.ts'
import { median } from './stats.ts'

/**
 * One row of the results table: our figure against the baseline's, both medians over the
 * repetitions of one run. ratio = ours / baseline.
 */
export interface Row {
  /** e.g. "fanout 1000" */
  label: string
  /** e.g. "p99" */
  metric: string
  unit: string
  ours: number
  baseline: number
  /** What the baseline column is (default "raw"). */
  baselineName?: string
  better: 'lower' | 'higher'
  /** Printed as a one-line summary (the table shows every row). */
  summary?: boolean
  /** Target on the ratio (ours / baseline) or on our absolute figure. */
  target?: { maxRatio?: number, minRatio?: number, maxOurs?: number }
  /** Why this run gives the target no verdict (e.g. the baseline saturated): neither met nor missed. */
  noVerdict?: string
  /** Per-repetition figures the medians come from. */
  reps: { ours: number[], baseline: number[] }
}

/** A row's figures from per-repetition values: both medians, and the values they come from. */
export function medians (ours: number[], baseline: number[]): Pick<Row, 'ours' | 'baseline' | 'reps'> {
  return { ours: median(ours), baseline: median(baseline), reps: { ours, baseline } }
}

export interface ScenarioResult {
  parameters: Record<string, unknown>
  rows: Row[]
  /** Scenario-specific raw figures (percentiles per repetition...), written to the JSON file. */
  raw: unknown
  notes?: string[]
}

/**
 * A benchmark scenario: one module in bench/scenarios/, listed in scenarios/index.ts.
 * Commands are how a scenario runs code inside the server / baseline / client processes:
 * `ctx` calls them as `<scenario name>:<command>`.
 */
export interface Scenario {
  name: string
  description: string
  /** Runs in `npm run bench` without naming it (keep the default run under 8 minutes). */
  default: boolean
  /** Its flags with their defaults, as `npm run bench -- --list` prints them. */
  flags: string
  /**
   * Its share of the default run, seconds: on a machine slower than the one the defaults were
   * set on, repetitions past the third are dropped to stay inside it (see Context#repetitions).
   */
  budgetSeconds?: number
  run (ctx: Context): Promise<ScenarioResult>
  serverCommands?: Record<string, (args: any, server: ServerState) => unknown>
  baselineCommands?: Record<string, (args: any, baseline: BaselineState) => unknown>
  /** Called for every socket that connects to the baseline server. */
  baselineConnection?: (socket: Socket, baseline: BaselineState) => void
  clientCommands?: Record<string, (args: any, client: ClientState) => unknown>
}
