import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { z } from 'zod'
import { parseOptions, refuseTakenDecorators, timerMs } from '../support.ts'
import type { PrismaClient } from '../../src/generated/prisma/client.ts'

export interface ErpHealthOptions {
  /** Prisma client whose database is probed. Required. */
  prisma: PrismaClient
  /** What the event log runs on, as reported in `eventLog.backend`. Default `'postgresql'`. */
  eventLogBackend?: 'postgresql' | 'pglite'
  /** A database probe slower than this counts as down. Default 2000. */
  databaseTimeoutMs?: number
  /** Route prefix. Default `'/health'` (`/health/websocket`, `/health/live`, `/health/ready`). */
  prefix?: string
}

export interface WebsocketHealth {
  status: 'ok' | 'degraded' | 'down'
  nodeId: string
  uptimeSeconds: number
  connections: number
  nodes: number
  adapter: { type: 'memory' | 'redis', status: 'up' | 'down' }
  database: { status: 'up' | 'down', latencyMs?: number }
  eventLog: { backend: 'postgresql' | 'pglite' }
}

declare module 'fastify' {
  interface FastifyInstance {
    /** The report behind GET /health/websocket. */
    websocketHealth (): Promise<WebsocketHealth>
  }
}

const optionsSchema = z.object({
  prisma: z.custom<PrismaClient>(v => typeof v === 'object' && v !== null && '$queryRaw' in v, 'must be a PrismaClient'),
  eventLogBackend: z.enum(['postgresql', 'pglite']).default('postgresql'),
  databaseTimeoutMs: timerMs(1).default(2000),
  prefix: z.string().regex(/^\/[\w\-/]*$/).default('/health')
}).strict()

/**
 * How long a probe's result (database, node count) is reused. Requests that arrive while a
 * probe runs wait for it instead of starting their own, and those within this time after it
 * settled get its result: one `SELECT 1` and one Redis count per node however many
 * orchestrators and load balancers ask. A result is never reused longer than this.
 */
export const HEALTH_PROBE_REUSE_MS = 500

/** `probe` run at most once at a time, its result reused for `reuseMs` after it settles. */
function shared<T> (probe: () => Promise<T>, reuseMs: number): () => Promise<T> {
  let inFlight: Promise<T> | undefined
  let last: { value: T, at: number } | undefined
  return () => {
    if (last && performance.now() - last.at < reuseMs) return Promise.resolve(last.value)
    inFlight ??= probe().then(value => {
      last = { value, at: performance.now() }
      return value
    }).finally(() => { inFlight = undefined })
    return inFlight
  }
}

/** Validates erp-health's options as registering it does, without registering it; throws naming the option. */
export const checkHealthOptions = (raw: unknown) => parseOptions('erp-health', optionsSchema, raw)

async function erpHealth (fastify: FastifyInstance, rawOptions: ErpHealthOptions) {
  const { prisma, eventLogBackend, databaseTimeoutMs, prefix } = checkHealthOptions(rawOptions)
  refuseTakenDecorators(fastify, 'erp-health', ['websocketHealth'])

  const queryDatabase = async (): Promise<WebsocketHealth['database']> => {
    const started = performance.now()
    let timer: NodeJS.Timeout | undefined
    try {
      await Promise.race([
        prisma.$queryRaw`SELECT 1`,
        new Promise((_resolve, reject) => {
          timer = setTimeout(() => reject(new Error('timeout')), databaseTimeoutMs)
        })
      ])
      return { status: 'up', latencyMs: Math.round((performance.now() - started) * 10) / 10 }
    } catch {
      return { status: 'down' }
    } finally {
      clearTimeout(timer)
    }
  }

  const probeDatabase = shared(queryDatabase, HEALTH_PROBE_REUSE_MS)
  const countNodes = shared(() => fastify.erpSocket.serverCount().catch(() => 1), HEALTH_PROBE_REUSE_MS)

  const report = async (): Promise<WebsocketHealth> => {
    const socket = fastify.erpSocket
    const [database, counted] = await Promise.all([probeDatabase(), countNodes()])
    const adapter = { type: socket.adapterType, status: socket.adapterStatus() }
    // A count reused from before the adapter went down is not this node's view any more.
    const nodes = adapter.status === 'down' ? 1 : counted
    const status = database.status === 'down' ? 'down' : adapter.status === 'down' ? 'degraded' : 'ok'
    return {
      status,
      nodeId: socket.nodeId,
      uptimeSeconds: Math.round((Date.now() - socket.startedAt.getTime()) / 1000),
      connections: fastify.io.of('/').sockets.size,
      nodes,
      adapter,
      database,
      eventLog: { backend: eventLogBackend }
    }
  }
  fastify.decorate('websocketHealth', report)

  // A node without its database cannot authenticate or record events: 503 takes it out of rotation.
  fastify.get(`${prefix}/websocket`, async (_request, reply) => {
    const health = await report()
    reply.code(health.status === 'down' ? 503 : 200)
    return health
  })
  fastify.get(`${prefix}/live`, async () => ({ status: 'ok' }))
  fastify.get(`${prefix}/ready`, async (_request, reply) => {
    const database = await probeDatabase()
    reply.code(database.status === 'up' ? 200 : 503)
    return { status: database.status === 'up' ? 'ok' : 'down', database }
  })
}

export default fp(erpHealth, { fastify: '5.x', name: 'erp-health', dependencies: ['erp-socket'] })
