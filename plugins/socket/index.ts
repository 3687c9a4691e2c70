import { hostname } from 'node:os'
import { randomBytes } from 'node:crypto'
import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { Server, type ServerOptions } from 'socket.io'
import { createAdapter } from '@socket.io/redis-adapter'
import { Redis, type RedisOptions } from 'ioredis'
import { z } from 'zod'
import type { ClientToServerEvents, InterServerEvents, ServerToClientEvents, SocketData } from '../events.ts'

export type ErpServer = Server<ClientToServerEvents, ServerToClientEvents, InterServerEvents, SocketData>

export interface RedisClients {
  /** Publisher connection. The caller keeps ownership: it is not closed by the plugin. */
  pubClient: Redis
  /** Subscriber connection (e.g. `pubClient.duplicate()`). Also kept by the caller. */
  subClient: Redis
}

export interface ErpSocketOptions {
  /**
   * Redis for the Socket.IO adapter: a URL (`redis://`, `rediss://`, password and TLS through
   * the URL), or clients you own. Default: unset, the in-memory adapter (single node).
   */
  redis?: string | RedisClients
  /** ioredis options for connections the plugin creates from a URL (retryStrategy, tls...). Default `{}`. */
  redisOptions?: RedisOptions
  /** Prefix of the adapter's Redis channels, so several apps can share one Redis. Default `'erp-realtime'`. */
  redisPrefix?: string
  /**
   * Exact origins allowed for CORS on the handshake and for the browser Origin check.
   * Default `[]`: same origin only (clients that send no Origin, like mobile apps, are not affected).
   */
  corsOrigins?: string[]
  /** Extra Socket.IO server options (path, pingInterval, maxHttpBufferSize...). Default `{}`. */
  serverOptions?: Partial<Omit<ServerOptions, 'cors' | 'adapter'>>
  /** This node's id in health reports and logs. Default `<hostname>-<pid>-<random>`. */
  nodeId?: string
}

export type AdapterStatus = 'up' | 'down'

export interface ErpSocketDecorator {
  nodeId: string
  startedAt: Date
  adapterType: 'memory' | 'redis'
  adapterStatus (): AdapterStatus
  /** Nodes sharing the adapter, this one included (1 on the memory adapter). */
  serverCount (): Promise<number>
  corsOrigins: readonly string[]
  /** Whether a browser Origin header may open a socket (same origin or listed). */
  originAllowed (origin: string | undefined, host: string | undefined): boolean
  /** Sends an inter-server event to the other nodes (no-op on the memory adapter). */
  toOtherNodes<E extends keyof InterServerEvents> (event: E, ...args: Parameters<InterServerEvents[E]>): void
}

declare module 'fastify' {
  interface FastifyInstance {
    io: ErpServer
    erpSocket: ErpSocketDecorator
  }
}

const optionsSchema = z.object({
  redis: z.union([
    z.string().regex(/^rediss?:\/\//, 'must be a redis:// or rediss:// URL'),
    z.object({ pubClient: z.custom<Redis>(v => v instanceof Redis), subClient: z.custom<Redis>(v => v instanceof Redis) })
  ]).optional(),
  redisOptions: z.record(z.string(), z.unknown()).optional(),
  redisPrefix: z.string().min(1).max(100).default('erp-realtime'),
  corsOrigins: z.array(z.string().regex(/^https?:\/\/[^/\s]+$/, 'must be an exact origin like https://app.example.com')).default([]),
  serverOptions: z.record(z.string(), z.unknown()).default({}),
  nodeId: z.string().min(1).max(200).optional()
})

function originAllowedFor (allowed: readonly string[]) {
  return (origin: string | undefined, host: string | undefined): boolean => {
    if (!origin) return true
    if (allowed.includes(origin)) return true
    try {
      return new URL(origin).host === host
    } catch {
      return false
    }
  }
}

async function erpSocket (fastify: FastifyInstance, rawOptions: ErpSocketOptions) {
  const parsed = optionsSchema.safeParse(rawOptions)
  if (!parsed.success) {
    const issue = parsed.error.issues[0]
    throw new Error(`erp-socket: invalid option ${issue?.path.join('.')}: ${issue?.message}`)
  }
  const options = parsed.data
  const nodeId = options.nodeId ?? `${hostname()}-${process.pid}-${randomBytes(3).toString('hex')}`
  const originAllowed = originAllowedFor(options.corsOrigins)

  const io: ErpServer = new Server(fastify.server, {
    ...options.serverOptions,
    // Browsers outside the list get no CORS headers; the auth middleware then refuses their
    // handshake with AUTH_ORIGIN_REFUSED (a readable code instead of an opaque network error).
    cors: options.corsOrigins.length > 0 ? { origin: options.corsOrigins, credentials: true } : undefined
  })

  let adapterType: 'memory' | 'redis' = 'memory'
  let adapterStatus = (): AdapterStatus => 'up'
  let ownedClients: Redis[] = []
  if (options.redis !== undefined) {
    adapterType = 'redis'
    let pub: Redis
    let sub: Redis
    if (typeof options.redis === 'string') {
      pub = new Redis(options.redis, { maxRetriesPerRequest: 2, ...(rawOptions.redisOptions ?? {}) })
      sub = pub.duplicate()
      ownedClients = [pub, sub]
    } else {
      pub = options.redis.pubClient
      sub = options.redis.subClient
    }
    // An unhandled 'error' on an ioredis client would crash the process; log once per outage instead.
    let lastLogged = ''
    const onError = (err: Error) => {
      if (err.message === lastLogged) return
      lastLogged = err.message
      fastify.log.warn({ err: err.message }, 'erp-socket: Redis adapter connection error')
    }
    const onReady = () => { lastLogged = '' }
    for (const client of [pub, sub]) {
      client.on('error', onError)
      client.on('ready', onReady)
    }
    io.adapter(createAdapter(pub, sub, { key: options.redisPrefix }))
    adapterStatus = () => (pub.status === 'ready' && sub.status === 'ready' ? 'up' : 'down')
    fastify.addHook('onClose', async () => {
      for (const client of [pub, sub]) {
        client.off('error', onError)
        client.off('ready', onReady)
        // Keep a sink so a late error on a client the caller owns cannot crash the process.
        if (!ownedClients.includes(client)) continue
        client.on('error', () => {})
      }
    })
  }

  const decorator: ErpSocketDecorator = {
    nodeId,
    startedAt: new Date(),
    adapterType,
    adapterStatus: () => adapterStatus(),
    async serverCount () {
      if (adapterType === 'memory' || adapterStatus() === 'down') return 1
      return await io.of('/').adapter.serverCount()
    },
    corsOrigins: Object.freeze([...options.corsOrigins]),
    originAllowed,
    toOtherNodes (event, ...args) {
      if (adapterType === 'redis') io.serverSideEmit(event, ...args)
    }
  }

  fastify.decorate('io', io)
  fastify.decorate('erpSocket', decorator)

  // Close the connections (not a Socket.IO "server disconnect") so clients reconnect, to
  // another node when there is one, and resume from their last seq.
  fastify.addHook('preClose', (done) => {
    io.local.emit('server:shutdown', { message: 'server shutting down, reconnect and resume' })
    io.local.disconnectSockets(true)
    done()
  })
  fastify.addHook('onClose', async () => {
    await io.close()
    await Promise.all(ownedClients.map(client => client.quit().catch(() => client.disconnect())))
  })
}

export default fp(erpSocket, { fastify: '5.x', name: 'erp-socket' })
