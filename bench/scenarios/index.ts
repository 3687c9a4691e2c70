import type { Scenario } from '../lib/scenario.ts'
import { cluster } from './cluster.ts'
import { conflicts } from './conflicts.ts'
import { connect } from './connect.ts'
import { fanout } from './fanout.ts'
import { presence } from './presence.ts'
import { replay } from './replay.ts'

/**
 * Every benchmark scenario, by name, in the order `npm run bench` runs them. To add one, write
 * bench/scenarios/<name>.ts exporting a Scenario and list it here.
 */
export const scenarios: Record<string, Scenario> = Object.fromEntries(
  [fanout, connect, replay, conflicts, cluster, presence].map(s => [s.name, s])
)
