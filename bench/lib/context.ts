import { Child } from './child.ts'
import { now, until } from './clock.ts'
import { createBenchDatabase, seedCompanies, seedCompany, type BenchDatabase, type SeededCompany } from './db.ts'
import type { Memory } from './memory.ts'
import { Histogram, type HistogramJSON } from './stats.ts'
import type { ServerArgs } from '../server.ts'

const SERVER = new URL('../server.ts', import.meta.url)
const BASELINE = new URL('../baseline-server.ts', import.meta.url)
const CLIENT = new URL('../client.ts', import.meta.url)

export interface ServerHandle {
  kind: 'ours' | 'raw'
  url: string
  port: number
  pid: number
  call<T = any> (cmd: string, args?: unknown, timeoutMs?: number): Promise<T>
  memory (): Promise<Memory>
  stats (): Promise<{ sockets: number, engine: number }>
  /** Waits until the server holds exactly `sockets` connections; false at the deadline. */
  waitForSockets (sockets: number, timeoutMs?: number): Promise<boolean>
  stop (): Promise<void>
}

export interface ConnectResult {
  connected: number
  failed: number
  errors: Record<string, number>
  startedAt: number
  endedAt: number
  /** connected / (last end - first start), per second. */
  rate: number
}

export interface Collected {
  received: number
  firstRecv: number
  lastRecv: number
  series: Record<string, Histogram>
}

/** The load-client processes of one scenario; groups of sockets are split evenly across them. */
export class ClientPool {
  constructor (readonly procs: Child[]) {}

  /**
   * Connects `tokens.length` authenticated sockets, `auths.length` sockets with those handshake
   * auths (the baseline's), or `count` anonymous ones to `url`, all processes at once.
   */
  async connect (group: string, url: string, options: { tokens?: string[], auths?: Array<Record<string, unknown>>, count?: number, countEvent?: string, concurrency?: number, deadlineMs?: number, timeoutMs?: number }): Promise<ConnectResult> {
    const n = this.procs.length
    const total = options.tokens?.length ?? options.auths?.length ?? options.count ?? 0
    const parts = this.procs.map((proc, i) => {
      const from = Math.floor(total * i / n)
      const to = Math.floor(total * (i + 1) / n)
      return proc.call('connect', {
        group,
        url,
        tokens: options.tokens?.slice(from, to),
        auths: options.auths?.slice(from, to),
        count: options.tokens || options.auths ? undefined : to - from,
        countEvent: options.countEvent,
        concurrency: Math.max(1, Math.floor((options.concurrency ?? 400) / n)),
        deadlineMs: options.deadlineMs ?? 120_000,
        timeoutMs: options.timeoutMs ?? 20_000
      }, (options.deadlineMs ?? 120_000) + 30_000)
    })
    const results: Array<Omit<ConnectResult, 'rate'>> = await Promise.all(parts)
    const errors: Record<string, number> = {}
    for (const r of results) for (const [k, v] of Object.entries(r.errors)) errors[k] = (errors[k] ?? 0) + v
    const connected = results.reduce((s, r) => s + r.connected, 0)
    const startedAt = Math.min(...results.map(r => r.startedAt))
    const endedAt = Math.max(...results.map(r => r.endedAt))
    return { connected, failed: total - connected, errors, startedAt, endedAt, rate: connected / ((endedAt - startedAt) / 1000) }
  }

  async listen (group: string, event: string, extractor: string): Promise<void> {
    await Promise.all(this.procs.map(p => p.call('listen', { group, event, extractor })))
  }

  async count (group: string): Promise<number> {
    const counts = await Promise.all(this.procs.map(p => p.call<number>('count', { group })))
    return counts.reduce((a, b) => a + b, 0)
  }

  /** CPU time all load-client processes have used so far (user + system), ms. */
  async cpu (): Promise<number> {
    const times = await Promise.all(this.procs.map(p => p.call<number>('cpu')))
    return times.reduce((a, b) => a + b, 0)
  }

  /** Waits until the group received `expected` events in total; returns the count reached. */
  async waitForCount (group: string, expected: number, deadline: number): Promise<number> {
    let seen = 0
    await until(async () => (seen = await this.count(group)) >= expected, deadline, 100)
    return seen
  }

  /** Merged histograms of the group (and resets them in the clients). */
  async collect (group: string): Promise<Collected> {
    const parts = await Promise.all(this.procs.map(p => p.call<{ received: number, firstRecv: number, lastRecv: number, series: Record<string, HistogramJSON> }>('collect', { group })))
    const series: Record<string, Histogram> = {}
    for (const part of parts) {
      for (const [name, json] of Object.entries(part.series)) (series[name] ??= new Histogram()).merge(json)
    }
    const withData = parts.filter(p => p.received > 0)
    return {
      received: parts.reduce((s, p) => s + p.received, 0),
      firstRecv: withData.length ? Math.min(...withData.map(p => p.firstRecv)) : 0,
      lastRecv: withData.length ? Math.max(...withData.map(p => p.lastRecv)) : 0,
      series
    }
  }

  async disconnect (group: string): Promise<void> {
    await Promise.all(this.procs.map(p => p.call('disconnect', { group })))
  }

  /** Calls a command on one client process (scenario commands are `<scenario>:<cmd>`). */
  call<T = any> (cmd: string, args?: unknown, timeoutMs?: number, proc = 0): Promise<T> {
    return this.procs[proc]!.call<T>(cmd, args, timeoutMs)
  }
}

export interface ContextOptions {
  quick: boolean
  reps: number
  /**
   * The default run's time for this scenario, ms: repetitions beyond the third stop once the
   * next one would not fit (a slower machine gets 3 instead of 5). Unset: always `reps`.
   */
  budgetMs?: number
  flags: Record<string, string | boolean>
  cpuProf?: string
  log: (message: string) => void
}

/** What a scenario gets: process and database helpers that are cleaned up after it. */
export class Context {
  readonly quick: boolean
  readonly reps: number
  readonly flags: Record<string, string | boolean>
  readonly log: (message: string) => void
  private readonly cpuProf?: string
  private readonly budgetMs?: number
  private readonly startedAt = now()
  private cleanups: Array<() => Promise<void>> = []
  /** Said in the output and the JSON with the scenario's own notes (repetitions dropped...). */
  readonly notes: string[] = []

  constructor (readonly scenario: string, options: ContextOptions) {
    this.quick = options.quick
    this.reps = options.reps
    this.budgetMs = options.budgetMs
    this.flags = options.flags
    this.log = (message) => options.log(`[${scenario}] ${message}`)
    this.cpuProf = options.cpuProf
  }

  /**
   * The repetition loop's condition: `for (let rep = 0, more = ctx.repetitions(); more(rep); rep++)`.
   * Always `reps` repetitions, except in the default run on a machine too slow for its budget:
   * then at least 3 (the minimum for a median), and more only while the next one, at
   * the pace of those before, fits in this loop's share of what is left (`loopsLeft` loops,
   * this one included, share it). Stopping early is logged and the JSON has the count.
   */
  repetitions (loopsLeft = 1): (done: number) => boolean {
    const loopStart = now()
    const budget = this.budgetMs === undefined ? undefined : (this.budgetMs - (loopStart - this.startedAt)) / loopsLeft
    return (done) => {
      if (done >= this.reps) return false
      if (budget === undefined || done < Math.min(3, this.reps)) return true
      const elapsed = now() - loopStart
      if (elapsed + elapsed / done <= budget) return true
      const note = `${this.scenario}: ${done} repetitions instead of ${this.reps} in one of its parts: another would not fit in the default run's time on this machine (${Math.round(budget / 1000)} s for that part)`
      this.log(note)
      this.notes.push(note)
      return false
    }
  }

  /** A numeric flag (`--sizes 100,1000` → [100, 1000]), or the default. */
  numbers (flag: string, fallback: number[]): number[] {
    const value = this.flags[flag]
    if (typeof value !== 'string') return fallback
    const parsed = value.split(',').map(Number).filter(n => Number.isFinite(n) && n > 0)
    return parsed.length ? parsed : fallback
  }

  number (flag: string, fallback: number): number {
    return this.numbers(flag, [fallback])[0]!
  }

  /** A fresh migrated PostgreSQL database, dropped after the scenario. */
  async database (): Promise<BenchDatabase> {
    const db = await createBenchDatabase()
    this.cleanups.push(() => db.drop())
    return db
  }

  seed (db: BenchDatabase, users: number): Promise<SeededCompany> {
    return seedCompany(db, users)
  }

  /** `count` companies of `usersPerCompany` users each, seeded together. */
  seedMany (db: BenchDatabase, count: number, usersPerCompany: number): Promise<SeededCompany[]> {
    return seedCompanies(db, count, usersPerCompany)
  }

  /** Our server (the real app) as a child process on `db`. */
  async startServer (db: BenchDatabase, options: Omit<ServerArgs, 'databaseUrl'> = {}): Promise<ServerHandle> {
    const execArgv = this.profileFlags('ours')
    const { child, info } = await Child.start<{ port: number }>(SERVER, { name: 'bench server', args: { ...options, databaseUrl: db.url }, execArgv })
    return this.handle('ours', child, info.port)
  }

  /** The baseline server (plain Fastify + Socket.IO) as a child process. */
  async startBaseline (): Promise<ServerHandle> {
    const execArgv = this.profileFlags('raw')
    const { child, info } = await Child.start<{ port: number }>(BASELINE, { name: 'baseline server', execArgv })
    return this.handle('raw', child, info.port)
  }

  /**
   * `count` load-client processes (default 2). They run with 64 MB semi-spaces: with Node's
   * default (16 MB), each one ran 275–289 scavenges in a `fanout --sizes 1000` run, 100–134 of
   * them pausing over 5 ms (up to 38 ms), and those pauses decided the p99 of whichever side
   * they fell on (the baseline's emit → receipt p99 25–29 ms per repetition, and 24–50 ms over
   * earlier runs; 17–21 ms with 64 MB, 91–98 scavenges). The servers keep Node's defaults.
   */
  async clients (count = 2): Promise<ClientPool> {
    const procs = await Promise.all(Array.from({ length: count }, (_, i) =>
      Child.start(CLIENT, { name: `bench client ${i + 1}`, execArgv: ['--max-semi-space-size=64', ...this.profileFlags('clients')] }).then(r => r.child)))
    this.cleanups.push(async () => { await Promise.all(procs.map(p => p.stop(3000))) })
    return new ClientPool(procs)
  }

  /**
   * --cpu-prof for a server or the load clients: one folder per scenario and side; Node names each file
   * CPU.<date>.<pid>.<thread>.<n>.cpuprofile (tsx's loader thread writes a small one too:
   * the largest file is the main thread).
   */
  private profileFlags (kind: 'ours' | 'raw' | 'clients'): string[] {
    return this.cpuProf ? ['--cpu-prof', '--cpu-prof-dir', `${this.cpuProf}/${this.scenario}-${kind}`] : []
  }

  /** A deadline `ms` from now, for until()/waitForCount(). */
  deadline (ms: number): number {
    return now() + ms
  }

  private handle (kind: 'ours' | 'raw', child: Child, port: number): ServerHandle {
    const stop = () => child.stop(10_000)
    this.cleanups.push(stop)
    const handle: ServerHandle = {
      kind,
      url: `http://127.0.0.1:${port}`,
      port,
      pid: child.pid,
      call: (cmd, args, timeoutMs) => child.call(cmd, args, timeoutMs),
      memory: () => child.call('memory'),
      stats: () => child.call('stats'),
      async waitForSockets (sockets, timeoutMs = 30_000) {
        return await until(async () => (await handle.stats()).sockets === sockets, now() + timeoutMs, 100)
      },
      stop
    }
    return handle
  }

  /** Runs `fn` at cleanup; cleanups run last first, so register before starting what it outlives. */
  onCleanup (fn: () => Promise<void>): void {
    this.cleanups.push(fn)
  }

  /**
   * Stops everything this scenario started (last first) and drops its databases. One run for
   * every caller: the scenario's end and the hard stop can both ask, and the process must not
   * exit while the other caller's database drop is still in flight.
   */
  cleanup (): Promise<void> {
    this.cleaning ??= this.runCleanups()
    return this.cleaning
  }

  private cleaning?: Promise<void>

  private async runCleanups (): Promise<void> {
    for (const fn of this.cleanups.reverse()) {
      try {
        await fn()
      } catch (err) {
        this.log(`cleanup: ${(err as Error).message}`)
      }
    }
    this.cleanups = []
  }
}
