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
