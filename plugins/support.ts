import DataLoader from 'dataloader'
import type { FastifyInstance } from 'fastify'
import { z, type ZodType } from 'zod'

/** Validates a plugin's options at registration; a failure names the plugin and the option. */
export function parseOptions<S extends ZodType> (plugin: string, schema: S, raw: unknown): z.output<S> {
  const parsed = schema.safeParse(withoutRegisterOptions(schema, raw))
  if (!parsed.success) {
    const issue = parsed.error.issues[0]
    // An unknown (misspelled) option has no path of its own: zod names it in the message.
    const where = issue?.path.length ? `option ${issue.path.join('.')}` : 'options'
    throw new Error(`${plugin}: invalid ${where}: ${issue?.message}`)
  }
  return parsed.data
}

// Fastify hands a plugin its own register options too; the plugins' schemas refuse unknown keys.
const REGISTER_OPTIONS = ['prefix', 'logLevel', 'logSerializers']
function withoutRegisterOptions (schema: ZodType, raw: unknown): unknown {
  if (typeof raw !== 'object' || raw === null || !(schema instanceof z.ZodObject)) return raw
  const own = new Set(Object.keys(schema.shape))
  const drop = REGISTER_OPTIONS.filter(key => key in raw && !own.has(key))
  if (drop.length === 0) return raw
  return Object.fromEntries(Object.entries(raw).filter(([key]) => !drop.includes(key)))
}

/**
 * Refuses the registration, before the plugin creates anything (connections, timers), when one
 * of its decorator names is taken (another Socket.IO plugin's `io`, say): failing later, at
 * `decorate`, left what it had created without the close hook that releases it. The same test
 * as Fastify's `decorate`: taken in this context itself (a parent's decorator may be shadowed,
 * as when the host app has its own `authenticate` and registers erp-realtime in a child context).
 */
export function refuseTakenDecorators (fastify: FastifyInstance, plugin: string, names: readonly string[]): void {
  for (const name of names) {
    if (Object.hasOwn(fastify, name)) throw new Error(`${plugin}: fastify.${name} is already decorated (another plugin uses the name)`)
  }
}

/**
 * The longest delay Node's timers accept (2^31 - 1 ms, about 24.8 days): a longer one is
 * replaced by 1 ms, so a monthly job would run back to back.
 */
export const MAX_TIMER_MS = 2_147_483_647

/** A plugin option that becomes a timer's delay: a whole number of milliseconds from `min` to MAX_TIMER_MS. */
export const timerMs = (min: number) => z.number().int().min(min).max(MAX_TIMER_MS)

/** The longest retention a TTL option takes (a cutoff further back is not a valid date for long). */
export const TEN_YEARS_S = 10 * 365 * 24 * 3600

/** How long close waits for a periodic job under way (a database that stopped answering must not hold it). */
export const EVERY_CLOSE_WAIT_MS = 2000

/** `promise`'s value, or `fallback` after `ms` (the timer does not hold the process). */
export async function withTimeout<T, F> (promise: Promise<T>, ms: number, fallback: F): Promise<T | F> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([promise, new Promise<F>(resolve => { timer = setTimeout(() => resolve(fallback), ms).unref() })])
  } finally {
    clearTimeout(timer)
  }
}

/**
 * Runs `job` every `intervalMs` (0 disables), never overlapping itself; the timer is unref'd
 * and cleared when Fastify closes, and close waits for a run under way (the app's owner closes
 * the database right after), at most EVERY_CLOSE_WAIT_MS. Failures are logged as warnings
 * naming `what`.
 */
export function every (fastify: FastifyInstance, intervalMs: number, what: string, job: () => Promise<unknown>): void {
  if (!Number.isInteger(intervalMs) || intervalMs < 0 || intervalMs > MAX_TIMER_MS) {
    throw new RangeError(`${what}: the interval must be 0 to ${MAX_TIMER_MS} ms, not ${intervalMs}`)
  }
  if (intervalMs === 0) return
  let running: Promise<void> | undefined
  const timer = setInterval(() => {
    if (running) return
    running = job().then(() => {}, err => { fastify.log.warn({ err }, `${what} failed`) }).finally(() => { running = undefined })
  }, intervalMs)
  timer.unref()
  fastify.addHook('onClose', async () => {
    clearInterval(timer)
    if (!running) return
    // A timer that holds the process: close must not end early for want of other handles.
    let bound: NodeJS.Timeout | undefined
    await Promise.race([running, new Promise<void>(resolve => { bound = setTimeout(resolve, EVERY_CLOSE_WAIT_MS) })])
    clearTimeout(bound)
  })
}

/** Repeats a bounded delete (returning its row count) until it deletes less than `batchSize`, at most `maxBatches` times. */
export async function deleteInBatches (batchSize: number, deleteBatch: () => Promise<number>, maxBatches = 10): Promise<number> {
  let deleted = 0
  for (let i = 0; i < maxBatches; i++) {
    const n = await deleteBatch()
    deleted += n
    if (n < batchSize) break
  }
  return deleted
}

/**
 * Turns a per-key lookup into batched calls: every `load(key)` started while the current I/O
 * callbacks run (a reconnect storm of handshakes, a burst of requests) is answered by a single
 * `loadMany(keys)` (at most `maxBatchSize` keys), and only one such call runs at a time, so keys
 * arriving meanwhile gather into the next one (the busier the node, the fewer the queries).
 * Nothing is cached; a failed call rejects every lookup of its batch. `loadMany` returns one
 * value per key, in order.
 */
export function batchPerTurn<K, V> (loadMany: (keys: readonly K[]) => Promise<V[]>, maxBatchSize = 500): (key: K) => Promise<V> {
  const ready: Array<() => void> = []
  let running: Promise<V[]> | undefined
  // DataLoader calls the batch function synchronously from `dispatch` (never for an empty batch).
  const pump = () => {
    while (!running && ready.length > 0) ready.shift()!()
  }
  const loader = new DataLoader<K, V>((keys) => {
    const call = loadMany(keys)
    running = call
    const done = () => {
      running = undefined
      setImmediate(pump)
    }
    call.then(done, done)
    return call
  }, {
    cache: false,
    maxBatchSize,
    // DataLoader's default waits for the current tick only; a storm arrives over many I/O
    // callbacks of one turn, and the next batch waits for the running call.
    batchScheduleFn: (dispatch) => {
      ready.push(dispatch)
      setImmediate(pump)
    }
  })
  return key => loader.load(key)
}

/** The digits of the row version an If-Match header names (`"3"`, `W/"3"`, `3`); undefined for any other value. */
export function ifMatchVersion (header: string): string | undefined {
  // Quoted (an entity tag, weak or strong) or bare, never half-quoted.
  const match = /^\s*(?:(?:W\/)?"(\d+)"|(\d+))\s*$/.exec(header)
  return match?.[1] ?? match?.[2]
}

/** A route option's hooks as an array (Fastify accepts one function or a list), to append to. */
export function hookList<T> (hooks: T | T[] | undefined): T[] {
  return hooks === undefined ? [] : Array.isArray(hooks) ? hooks : [hooks]
}

/**
 * The SQLSTATE and message PostgreSQL raised, from an error of a Prisma query through a driver
 * adapter (`@prisma/adapter-pg` or PGlite's); undefined for any other error.
 */
export function sqlErrorOf (err: unknown): { code: string, message: string } | undefined {
  type Cause = { originalCode?: string, originalMessage?: string }
  const e = err as { name?: unknown, cause?: Cause, meta?: { driverAdapterError?: { cause?: Cause } } } | null | undefined
  // A query's error comes wrapped by Prisma; a transaction's COMMIT rejects with the adapter's own.
  const cause = e?.meta?.driverAdapterError?.cause ?? (e?.name === 'DriverAdapterError' ? e.cause : undefined)
  return cause?.originalCode === undefined ? undefined : { code: cause.originalCode, message: cause.originalMessage ?? '' }
}

// Socket failures of a database client (pg's own, or Node's from connect()).
const UNREACHABLE_SOCKET_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'ENETDOWN', 'EHOSTDOWN', 'EADDRNOTAVAIL', 'EPIPE'])
// What `@prisma/adapter-pg` maps a failure to get or keep a session to (`DriverAdapterError.cause.kind`),
// and the Prisma codes of those kinds.
const UNREACHABLE_ADAPTER_KINDS = new Set([
  'DatabaseNotReachable', 'ConnectionClosed', 'SocketTimeout', 'TooManyConnections', 'TlsConnectionError',
  'DatabaseDoesNotExist', 'DatabaseAccessDenied', 'AuthenticationFailed'
])
const UNREACHABLE_PRISMA_CODES = new Set(['P1000', 'P1001', 'P1002', 'P1003', 'P1008', 'P1010', 'P1011', 'P1017', 'P2037'])
// pg's errors without a code when a connection is lost or cannot be had.
const UNREACHABLE_PG_MESSAGE = /^(Connection terminated|Client has encountered a connection error|timeout exceeded when trying to connect)/

/**
 * True when `err` says the node cannot get or keep a database session (server unreachable or
 * down, connection lost, no connection slot, the database refusing connections): an outage
 * answered `SERVICE_UNAVAILABLE`, rather than a query that failed. Looks at the error and along
 * its `meta.driverAdapterError` (Prisma) and `cause` chain for socket codes (ECONNREFUSED,
 * ECONNRESET, ETIMEDOUT, ...), `@prisma/adapter-pg`'s connection kinds (DatabaseNotReachable,
 * ConnectionClosed, SocketTimeout, TooManyConnections, ...) and their Prisma codes (P1001,
 * P1017, ...), SQLSTATE class 08 (connection exception) and 57P01-57P03 (shutdown, crash,
 * cannot connect now), any error PostgreSQL raised with severity FATAL or PANIC (the server
 * ended the session: e.g. 55000 for a database not accepting connections), and pg's
 * "Connection terminated..." errors.
 */
export function databaseUnreachable (err: unknown): boolean {
  let current: unknown = err
  for (let depth = 0; depth < 6 && typeof current === 'object' && current !== null; depth++) {
    const e = current as { code?: unknown, originalCode?: unknown, severity?: unknown, kind?: unknown, message?: unknown, meta?: { driverAdapterError?: unknown }, cause?: unknown }
    for (const code of [e.code, e.originalCode]) {
      if (typeof code !== 'string') continue
      if (UNREACHABLE_SOCKET_CODES.has(code) || UNREACHABLE_PRISMA_CODES.has(code)) return true
      if (/^08[0-9A-Z]{3}$/.test(code) || /^57P0[123]$/.test(code)) return true
    }
    if (e.severity === 'FATAL' || e.severity === 'PANIC') return true
    if (typeof e.kind === 'string' && UNREACHABLE_ADAPTER_KINDS.has(e.kind)) return true
    if (typeof e.message === 'string' && UNREACHABLE_PG_MESSAGE.test(e.message)) return true
    // No server behind PostgreSQL's unix socket path (connect ENOENT on `.s.PGSQL.<port>`); other
    // failed connects (a host app's sidecar socket) are not the database's.
    const { syscall, address } = e as { syscall?: unknown, address?: unknown }
    if (syscall === 'connect' && typeof address === 'string' && address.includes('.s.PGSQL.')) return true
    // A host with several addresses: Node reports the failed connects as one AggregateError.
    if (current instanceof AggregateError && current.errors.length > 0 &&
      current.errors.every(inner => UNREACHABLE_SOCKET_CODES.has(String((inner as { code?: unknown } | null)?.code)))) return true
    current = e.meta?.driverAdapterError ?? e.cause
  }
  return false
}
