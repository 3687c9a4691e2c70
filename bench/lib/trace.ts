import { PerformanceObserver, constants } from 'node:perf_hooks'
import type { FastifyInstance } from 'fastify'
import { now } from './clock.ts'
import { requestTimeOf } from './envelope.ts'

/**
 * `--trace` (fanout): what each process was doing when a change was slow. The orchestrator sets
 * BENCH_TRACE=1 for its children; each then records its GC pauses of 2 ms or more and its
 * event-loop stalls of 6 ms or more (a 2 ms timer that fired late) with the CPU time the process
 * used meanwhile (about the stall's length: its own work; much less: it waited for a core),
 * which `trace` returns and clears. The timer costs every process some CPU, so traced
 * runs are for finding causes, not for the figures.
 */
export const tracing = process.env.BENCH_TRACE === '1'

export interface TraceEvent { t: number, ms: number, what: string }

const GC_KINDS: Record<number, string> = {
  [constants.NODE_PERFORMANCE_GC_MAJOR]: 'gc-major',
  [constants.NODE_PERFORMANCE_GC_MINOR]: 'gc-minor',
  [constants.NODE_PERFORMANCE_GC_INCREMENTAL]: 'gc-incremental',
  [constants.NODE_PERFORMANCE_GC_WEAKCB]: 'gc-weak'
}

/** Starts recording in this process (when tracing) and adds the `trace` command. */
export function installTrace (handlers: Record<string, (args: any) => unknown>): void {
  if (!tracing) return
  const events: TraceEvent[] = []
  const round = (ms: number) => Math.round(ms * 10) / 10
  new PerformanceObserver(list => {
    for (const entry of list.getEntries()) {
      const kind = (entry as { detail?: { kind?: number } }).detail?.kind ?? -1
      if (entry.duration >= 2) events.push({ t: performance.timeOrigin + entry.startTime, ms: round(entry.duration), what: GC_KINDS[kind] ?? 'gc' })
    }
  }).observe({ entryTypes: ['gc'] })
  // A stall's own CPU time tells a busy event loop (cpu ≈ ms) from a process that waited for a core.
  let last = now()
  let lastCpu = process.cpuUsage()
  setInterval(() => {
    const t = now()
    const cpu = process.cpuUsage()
    if (t - last >= 6) events.push({ t: last, ms: round(t - last), what: `stall (cpu ${round((cpu.user + cpu.system - lastCpu.user - lastCpu.system) / 1000)})` })
    last = t
    lastCpu = cpu
  }, 2).unref()
  handlers.trace = () => events.splice(0)
}

/** Server side: the time each request reached the server, stamped on its broadcast as `tRecv`. */
export function stampArrivals (app: FastifyInstance): (t0: number) => number | undefined {
  const arrivals = new Map<number, number>()
  if (tracing) {
    app.addHook('onRequest', async (request) => { (request as { arrivedAt?: number }).arrivedAt = now() })
    app.addHook('preHandler', async (request) => {
      const body = request.body as { t0?: unknown, name?: unknown } | undefined
      const t0 = typeof body?.t0 === 'number' ? body.t0 : requestTimeOf(body?.name)
      const arrivedAt = (request as { arrivedAt?: number }).arrivedAt
      if (Number.isFinite(t0) && arrivedAt !== undefined) arrivals.set(t0, arrivedAt)
    })
  }
  return (t0) => {
    const arrivedAt = arrivals.get(t0)
    arrivals.delete(t0)
    return arrivedAt
  }
}
