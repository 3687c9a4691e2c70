/**
 * A load-client process: holds groups of socket.io-client connections (websocket only) and
 * records receive latencies into histograms. Driven by the orchestrator over IPC (lib/child.ts).
 */
import { io, type Socket } from 'socket.io-client'
import { childArgs, serveParent, type Handlers } from './lib/child.ts'
import { now, sleep } from './lib/clock.ts'
import { requestTimeOf } from './lib/envelope.ts'
import { cpu } from './lib/memory.ts'
import { Histogram } from './lib/stats.ts'
import { tracing } from './lib/trace.ts'
import { scenarios } from './scenarios/index.ts'

export interface Group {
  sockets: Socket[]
  series: Map<string, Histogram>
  received: number
  firstRecv: number
  lastRecv: number
}

export interface ClientState {
  groups: Map<string, Group>
  group (name: string): Group
  open (url: string, auth: Record<string, unknown> | undefined, timeoutMs: number, prepare?: (socket: Socket) => void): Promise<Socket>
}

/** The request time our route's clients put in the project name ("bench <t0>"). */
const requestTime = (p: any) => requestTimeOf(p?.data?.project?.name)

/**
 * The latencies a received payload gives, per series, from its receipt time `t`: "request"
 * (request start → receipt), "emit" (the server's broadcast → receipt) and "route" (request
 * start → broadcast: the sender, HTTP, and for ours the route's auth and database work).
 * Both sides send the same envelope: the request time in the project name ("bench <t0>") and
 * `tEmit`, stamped when the server broadcasts (ours: bench/server.ts, after the commit).
 */
const envelopeLatencies = (p: any, t: number): Array<[string, number]> => {
  const t0 = requestTime(p)
  const series: Array<[string, number]> = [['request', t - t0]]
  if (typeof p?.tEmit === 'number') series.push(['emit', t - p.tEmit], ['route', p.tEmit - t0])
  return series
}

/** By name, as `listen` gets it: our POST /projects → project:created, the baseline's POST /emit. */
const extractors: Record<string, (payload: any, t: number) => Array<[string, number]>> = {
  'project-name': envelopeLatencies,
  raw: envelopeLatencies
}

/** With --trace: per change (keyed by its request time), when this process's sockets got it. */
export interface ChangeTrace { t0: number, tRecv?: number, tEmit?: number, first: number, last: number, received: number }
const changes = new Map<number, ChangeTrace>()
const traceChange = (payload: any, t: number) => {
  const t0 = requestTime(payload)
  let change = changes.get(t0)
  if (!change) changes.set(t0, change = { t0, tRecv: payload?.tRecv, tEmit: payload?.tEmit, first: t, last: t, received: 0 })
  change.first = Math.min(change.first, t)
  change.last = Math.max(change.last, t)
  change.received++
}

const groups = new Map<string, Group>()
const group = (name: string): Group => {
  let g = groups.get(name)
  if (!g) {
    g = { sockets: [], series: new Map(), received: 0, firstRecv: 0, lastRecv: 0 }
    groups.set(name, g)
  }
  return g
}

/** `prepare` runs before the handshake (listeners that must not miss what follows the connect). */
const open = (url: string, auth: Record<string, unknown> | undefined, timeoutMs: number, prepare?: (socket: Socket) => void): Promise<Socket> => {
  const socket = io(url, { transports: ['websocket'], reconnection: false, forceNew: true, timeout: timeoutMs, auth: auth ?? {} })
  prepare?.(socket)
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { socket.disconnect(); reject(new Error('CONNECT_TIMEOUT')) }, timeoutMs)
    socket.once('connect', () => { clearTimeout(timer); resolve(socket) })
    socket.once('connect_error', (err: Error & { data?: { code?: string } }) => {
      clearTimeout(timer)
      socket.disconnect()
      reject(new Error(err.data?.code ?? err.message))
    })
  })
}

const state: ClientState = { groups, group, open }

const handlers: Handlers = {
  /**
   * Opens `tokens.length` connections (handshake `auth: { token }`), `auths.length` (each its
   * own handshake auth, for the baseline) or `count` anonymous ones, `concurrency` at a time.
   * With `countEvent`, the group counts every such event its sockets receive (`count`).
   */
  async connect ({ group: name, url, tokens, auths, count, countEvent, concurrency = 200, timeoutMs = 20_000, deadlineMs = 120_000 }: {
    group: string, url: string, tokens?: string[], auths?: Array<Record<string, unknown>>, count?: number, countEvent?: string, concurrency?: number, timeoutMs?: number, deadlineMs?: number
  }) {
    const g = group(name)
    const counted = () => { g.received++ }
    const prepare = countEvent ? (socket: Socket) => { socket.on(countEvent, counted) } : undefined
    const total = tokens?.length ?? auths?.length ?? count ?? 0
    const authFor = (i: number) => tokens ? { token: tokens[i] } : auths?.[i]
    const errors: Record<string, number> = {}
    let next = 0
    let connected = 0
    const startedAt = now()
    const deadline = startedAt + deadlineMs
    const worker = async () => {
      while (next < total && now() < deadline) {
        const i = next++
        try {
          g.sockets.push(await open(url, authFor(i), timeoutMs, prepare))
          connected++
        } catch (err) {
          const code = (err as Error).message
          errors[code] = (errors[code] ?? 0) + 1
        }
      }
    }
    await Promise.all(Array.from({ length: Math.min(concurrency, total) }, worker))
    return { connected, failed: total - connected, errors, startedAt, endedAt: now() }
  },

  /** Records the latency of every `event` on the group's sockets. */
  listen ({ group: name, event, extractor }: { group: string, event: string, extractor: string }) {
    const g = group(name)
    const extract = extractors[extractor]
    if (!extract) throw new Error(`unknown extractor ${extractor}`)
    for (const socket of g.sockets) {
      socket.on(event, (payload: unknown) => {
        const t = now()
        for (const [series, ms] of extract(payload, t)) {
          let h = g.series.get(series)
          if (!h) g.series.set(series, h = new Histogram())
          h.record(ms)
        }
        if (tracing) traceChange(payload, t)
        if (g.received === 0) g.firstRecv = t
        g.received++
        g.lastRecv = t
      })
    }
    return { sockets: g.sockets.length }
  },

  /** With --trace: the changes received since the last call (and forgets them). */
  changes () {
    const list = [...changes.values()]
    changes.clear()
    return list
  },

  count ({ group: name }: { group: string }) {
    return group(name).received
  },

  cpu,

  /** Returns and resets what the group recorded. */
  collect ({ group: name }: { group: string }) {
    const g = group(name)
    const result = {
      received: g.received,
      firstRecv: g.firstRecv,
      lastRecv: g.lastRecv,
      series: Object.fromEntries([...g.series].map(([k, h]) => [k, h.toJSON()]))
    }
    g.series = new Map()
    g.received = 0
    g.firstRecv = 0
    g.lastRecv = 0
    return result
  },

  async disconnect ({ group: name }: { group: string }) {
    const g = groups.get(name)
    if (!g) return { closed: 0 }
    for (const socket of g.sockets) socket.disconnect()
    groups.delete(name)
    // Let the close frames go out before the next measurement starts.
    await sleep(200)
    return { closed: g.sockets.length }
  },

  close () {
    for (const g of groups.values()) for (const socket of g.sockets) socket.disconnect()
    setTimeout(() => process.exit(0), 100)
  }
}

// Scenario-specific client commands (each scenario module may add its own).
for (const scenario of Object.values(scenarios)) {
  for (const [cmd, fn] of Object.entries(scenario.clientCommands ?? {})) {
    handlers[`${scenario.name}:${cmd}`] = (args: unknown) => fn(args, state)
  }
}

childArgs<Record<string, never>>()
serveParent(handlers, { pid: process.pid })
