import DataLoader from 'dataloader'
import type { FastifyInstance } from 'fastify'
import type { z, ZodType } from 'zod'

/** Validates a plugin's options at registration; a failure names the plugin and the option. */
export function parseOptions<S extends ZodType> (plugin: string, schema: S, raw: unknown): z.output<S> {
  const parsed = schema.safeParse(raw)
  if (!parsed.success) {
    const issue = parsed.error.issues[0]
    throw new Error(`${plugin}: invalid option ${issue?.path.join('.')}: ${issue?.message}`)
  }
  return parsed.data
}

/**
 * Runs `job` every `intervalMs` (0 disables), never overlapping itself; the timer is unref'd
 * and cleared when Fastify closes. Failures are logged as warnings naming `what`.
 */
export function every (fastify: FastifyInstance, intervalMs: number, what: string, job: () => Promise<unknown>): void {
  if (intervalMs === 0) return
  let running = false
  const timer = setInterval(() => {
    if (running) return
    running = true
    job().catch(err => fastify.log.warn({ err }, `${what} failed`)).finally(() => { running = false })
  }, intervalMs)
  timer.unref()
  fastify.addHook('onClose', async () => clearInterval(timer))
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

/** A route option's hooks as an array (Fastify accepts one function or a list), to append to. */
export function hookList<T> (hooks: T | T[] | undefined): T[] {
  return hooks === undefined ? [] : Array.isArray(hooks) ? hooks : [hooks]
}

/**
 * The SQLSTATE and message PostgreSQL raised, from an error of a Prisma query through a driver
 * adapter (`@prisma/adapter-pg` or PGlite's); undefined for any other error.
 */
export function sqlErrorOf (err: unknown): { code: string, message: string } | undefined {
  const cause = (err as { meta?: { driverAdapterError?: { cause?: { originalCode?: string, originalMessage?: string } } } })?.meta?.driverAdapterError?.cause
  return cause?.originalCode === undefined ? undefined : { code: cause.originalCode, message: cause.originalMessage ?? '' }
}
