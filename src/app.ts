import Fastify, { type FastifyInstance, type FastifyServerOptions } from 'fastify'
import cors from '@fastify/cors'
import erpRealtime, { type ErpRealtimeOptions } from '../plugins/index.ts'
import { erpErrorHandler } from '../plugins/errors.ts'
import type { AppConfig } from './config.ts'
import type { Database, PrismaClient } from './db/index.ts'
import { drainOnClose } from './drain.ts'
import { authRoutes } from './routes/auth.ts'
import { expenseRoutes } from './routes/expenses.ts'
import { projectRoutes } from './routes/projects.ts'
import { stockRoutes } from './routes/stock.ts'

declare module 'fastify' {
  interface FastifyInstance {
    prisma: PrismaClient
  }
}

export interface BuildOptions {
  config: AppConfig
  /** An open database; the app does not close it (the caller opened it). */
  db: Database
  logger?: FastifyServerOptions['logger']
  /** Overrides for the erp-realtime plugins (tests shorten intervals here). */
  realtime?: Partial<Omit<ErpRealtimeOptions, 'prisma' | 'jwtSecret'>>
  /** How long requests in flight may run once the app starts closing; then their connections are destroyed. Default 5000. */
  drainTimeoutMs?: number
}

/** Trusts the first `hops` proxies in front of the server (Fastify's numeric trustProxy). */
const trustHops = (hops: number) => (_address: string, hop: number) => hop < hops

/** The erp-realtime application: the plugins plus the ERP's domain routes. */
export async function buildApp ({ config, db, logger = false, realtime = {}, drainTimeoutMs = 5000 }: BuildOptions): Promise<FastifyInstance> {
  const app = Fastify({
    logger,
    bodyLimit: 256 * 1024,
    // Behind a proxy, the client's address (the login limit is keyed by it) comes from X-Forwarded-For.
    trustProxy: typeof config.trustProxy === 'number' ? trustHops(config.trustProxy) : config.trustProxy,
    // Ids are validated up to 128 characters; longer params get the same 400 as other bad ids.
    routerOptions: { maxParamLength: 256 },
    // Requests in flight finish on close (drainOnClose): 'idle' never destroys a busy connection.
    forceCloseConnections: 'idle',
    // Router errors (bad URL encoding, an over-long :id) answer in the contract's error shape too.
    frameworkErrors: (err, request, reply) => erpErrorHandler(err, request, reply)
  })
  app.setErrorHandler(erpErrorHandler)
  drainOnClose(app, drainTimeoutMs)
  app.setNotFoundHandler((request, reply) => {
    reply.code(404).send({ error: { code: 'NOT_FOUND', message: `Route ${request.method} ${request.url.split('?')[0]} not found` } })
  })
  app.decorate('prisma', db.prisma)
  try {
    await registerAll(app, config, db, realtime)
  } catch (err) {
    // A failed registration (a bad option, say) after others created connections and timers:
    // the caller gets no app to close, so close it here, or the process would not exit.
    await app.close().catch(() => {})
    throw err
  }
  return app
}

async function registerAll (app: FastifyInstance, config: AppConfig, db: Database, realtime: NonNullable<BuildOptions['realtime']>): Promise<void> {
  // Same-origin only unless CORS_ORIGINS lists exact origins.
  if (config.corsOrigins.length > 0) await app.register(cors, { origin: config.corsOrigins, credentials: true })

  await app.register(erpRealtime, {
    prisma: db.prisma,
    jwtSecret: config.jwtSecret,
    ...realtime,
    socket: { corsOrigins: config.corsOrigins, redis: config.redisUrl, redisPrefix: config.redisPrefix, ...realtime.socket },
    // The PostgreSQL client of openDatabase refuses to commit an aborted transaction itself.
    eventLog: { ttlSeconds: config.eventLogTtlSeconds, maxLen: config.eventLogMaxLen, headIntervalMs: config.syncHeadIntervalMs, abortedCheck: db.kind === 'postgresql' ? 'driver' : 'statement', ...realtime.eventLog },
    health: { eventLogBackend: db.kind, ...realtime.health },
    // This app's versioned entities: a misspelled strategy key fails the registration.
    conflicts: { entities: ['project', 'expense', 'stockItem'], ...realtime.conflicts },
    // Every covered route of this app writes through eventLog, so a claim left by a crash can
    // be recovered (erp-idempotency's recoverAfterMs).
    idempotency: { recoverAfterMs: 60_000, ...realtime.idempotency },
    // The store is left to erp-presence: the adapter's Redis (keys under <redisPrefix>:presence)
    // when REDIS_URL is set, shared by every node; one node's memory otherwise.
    presence: {
      graceMs: config.presenceGraceMs,
      ...realtime.presence
    }
  })
  await app.register(authRoutes, { loginAttemptsPerMinute: config.loginAttemptsPerMinute })
  await app.register(projectRoutes)
  await app.register(expenseRoutes)
  await app.register(stockRoutes)
}
