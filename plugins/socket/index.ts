import { hostname } from 'node:os'
import { randomBytes } from 'node:crypto'
import type { Duplex } from 'node:stream'
import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { Server, type ServerOptions } from 'socket.io'
import { createAdapter } from '@socket.io/redis-adapter'
import { Redis, type RedisOptions } from 'ioredis'
import { z } from 'zod'
import { parseOptions, withTimeout, refuseTakenDecorators } from '../support.ts'
import { coalesceWrites, type CoalesceOptions } from './coalesce.ts'
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
  /**
   * ioredis options for the connections the plugin creates from a URL (`retryStrategy`, `tls`,
   * `connectTimeout`...). Default `{}`; the publisher then uses `maxRetriesPerRequest: 2` (a
   * publish during an outage fails fast instead of piling up; other nodes fill the gap from
   * the event log) and `commandTimeout: 2000` (a Redis that hangs with its connection open
   * fails a command after 2 s instead of never), and the subscriber always uses
   * `maxRetriesPerRequest: null` with the offline queue on and no command timeout (its
   * subscriptions wait for Redis instead of being lost). Sentinel or cluster:
   * create the clients yourself and pass `redis: { pubClient, subClient }`.
   */
  redisOptions?: RedisOptions
  /** Prefix of the adapter's Redis channels, so several apps can share one Redis. Default `'erp-realtime'`. */
  redisPrefix?: string
  /**
   * How long `serverCount()` (health's `nodes`) waits for Redis before answering 1 (the adapter
   * then counts as down until Redis answers again), and how long a recovery PING waits. Default 1000.
   */
  redisTimeoutMs?: number
  /**
   * Exact origins allowed for CORS on the handshake and for the browser Origin check.
   * Default `[]`: same origin only (clients that send no Origin, like mobile apps, are not affected).
   */
  corsOrigins?: string[]
  /** Extra Socket.IO server options (path, pingInterval, maxHttpBufferSize...). Default `{}`. */
  serverOptions?: Partial<Omit<ServerOptions, 'cors' | 'adapter' | 'connectionStateRecovery'>>
  /** This node's id in health reports and logs. Default `<hostname>-<pid>-<random>`. */
  nodeId?: string
  /**
   * Merge the WebSocket frames a connection is sent in one turn of the event loop into one
   * socket write (see `coalesceWrites`): fewer system calls when events or presence changes
   * come in bursts, no added delay for a lone event; a broadcast's pre-encoded frame is written
   * straight to each up-to-date WebSocket connection instead of through engine.io's packet
   * queue (about half a broadcast's CPU). `{ sliceSize }` sets how many connections are written
   * per turn (default 16). Default `true`.
   */
  coalesceWrites?: boolean | CoalesceOptions
}

export type AdapterStatus = 'up' | 'down'

export interface ErpSocketDecorator {
  nodeId: string
  startedAt: Date
  adapterType: 'memory' | 'redis'
  /** Key/channel prefix of the Redis adapter (`redisPrefix`), for plugins that share the Redis. */
  redisPrefix: string
  /**
   * `'down'` while a Redis connection of the adapter is not ready, or while Redis does not answer
   * (the last `serverCount()` or a publisher command timed out or failed, until a PING or a
   * later count succeeds). Always `'up'` on the memory adapter.
   */
  adapterStatus (): AdapterStatus
  /**
   * Nodes sharing the adapter, this one included (1 on the memory adapter). Never rejects and
   * never waits longer than `redisTimeoutMs`: answers 1 when Redis is down or slow, at once
   * (without asking Redis) while the adapter is down.
   */
  serverCount (): Promise<number>
  corsOrigins: readonly string[]
  /** Whether a browser Origin header may open a socket (same origin or listed). */
  originAllowed (origin: string | undefined, host: string | undefined): boolean
  /** Sends an inter-server event to the other nodes (no-op on the memory adapter). */
  toOtherNodes<E extends keyof InterServerEvents> (event: E, ...args: Parameters<InterServerEvents[E]>): void
  /**
   * Opens a new connection to the adapter's Redis with its publisher's options (`duplicate()`),
   * `options` over them, for a plugin that shares that Redis (erp-presence by default); the
   * caller owns and closes it. Undefined on the memory adapter.
   */
  redisConnection?: (options?: RedisOptions) => Redis
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
    z.object({ pubClient: z.custom<Redis>(v => v instanceof Redis), subClient: z.custom<Redis>(v => v instanceof Redis) }).strict()
  ]).optional(),
  redisOptions: z.record(z.string(), z.unknown()).optional(),
  redisPrefix: z.string().min(1).max(100).default('erp-realtime'),
  redisTimeoutMs: z.number().int().min(1).max(60000).default(1000),
  corsOrigins: z.array(z.string().regex(/^https?:\/\/[^/\s]+$/, 'must be an exact origin like https://app.example.com')).default([]),
  // Socket.IO's connection state recovery skips the middlewares (erp-auth's token and membership
  // checks) for a recovered socket by default; erp-offline-queue's sync:resume does its job.
  serverOptions: z.record(z.string(), z.unknown()).refine(o => o.connectionStateRecovery === undefined, {
    message: 'is not supported: recovered sockets would skip authentication; clients resume with sync:resume',
    path: ['connectionStateRecovery']
  }).default({}),
  nodeId: z.string().min(1).max(200).optional(),
  coalesceWrites: z.union([z.boolean(), z.object({ sliceSize: z.number().int().min(1).max(1_000_000).optional() }).strict()]).default(true)
}).strict()

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

/** Validates erp-socket's options as registering it does, without registering it; throws naming the option. */
export const checkSocketOptions = (raw: unknown) => parseOptions('erp-socket', optionsSchema, raw)

async function erpSocket (fastify: FastifyInstance, rawOptions: ErpSocketOptions) {
  const options = checkSocketOptions(rawOptions)
  refuseTakenDecorators(fastify, 'erp-socket', ['io', 'erpSocket'])
  const nodeId = options.nodeId ?? `${hostname()}-${process.pid}-${randomBytes(3).toString('hex')}`
  const originAllowed = originAllowedFor(options.corsOrigins)

  // From preClose on, new engine.io connections are refused (engine.io answers them itself,
  // past Fastify's 503-while-closing): one arriving after the others were closed would get no
  // notice and hold the HTTP server's close.
  let closing = false
  const ownAllowRequest = options.serverOptions?.allowRequest as ServerOptions['allowRequest'] | undefined
  const allowRequest: ServerOptions['allowRequest'] = (req, callback) => {
    if (closing) return callback('server shutting down', false)
    if (ownAllowRequest) return ownAllowRequest(req, callback)
    callback(null, true)
  }
  // The TCP connections of upgraded (WebSocket) requests, cut at close if still open.
  const upgraded = new Set<Duplex>()
  const onUpgrade = (_request: unknown, socket: Duplex) => {
    upgraded.add(socket)
    socket.once('close', () => upgraded.delete(socket))
  }
  fastify.server.on('upgrade', onUpgrade)

  const io: ErpServer = new Server(fastify.server, {
    ...options.serverOptions,
    allowRequest,
    // Browsers outside the list get no CORS headers; the auth middleware then refuses their
    // handshake with AUTH_ORIGIN_REFUSED (a readable code instead of an opaque network error).
    cors: options.corsOrigins.length > 0 ? { origin: options.corsOrigins, credentials: true } : undefined
  })

  let adapterType: 'memory' | 'redis' = 'memory'
  let adapterStatus = (): AdapterStatus => 'up'
  let countServers = async (): Promise<number> => 1
  let ownedClients: Redis[] = []
  let releaseAdapterClients = () => {}
  let redisConnection: ((options?: RedisOptions) => Redis) | undefined
  if (options.redis !== undefined) {
    adapterType = 'redis'
    let pub: Redis
    let sub: Redis
    if (typeof options.redis === 'string') {
      pub = new Redis(options.redis, { maxRetriesPerRequest: 2, commandTimeout: PUBLISHER_COMMAND_TIMEOUT_MS, ...(rawOptions.redisOptions ?? {}) })
      // The subscriber only ever sends (p)subscribe: let them wait for Redis rather than fail,
      // or the node would stay deaf to other nodes after an outage at start-up. No command
      // timeout either (duplicate() would copy the publisher's): a timed-out subscribe is not
      // sent again until the next 'ready'.
      sub = pub.duplicate({ maxRetriesPerRequest: null, enableOfflineQueue: true, commandTimeout: undefined })
      ownedClients = [pub, sub]
    } else {
      pub = options.redis.pubClient
      sub = options.redis.subClient
    }
    redisConnection = (overrides) => pub.duplicate(overrides)
    // An unhandled 'error' on an ioredis client would crash the process; log once per outage instead.
    let lastLogged = ''
    const warn = (message: string, what: string) => {
      if (message === lastLogged) return
      lastLogged = message
      fastify.log.warn({ err: message }, `erp-socket: ${what}`)
    }
    const onError = (err: Error) => warn(err.message, 'Redis adapter connection error')
    const onReady = () => { lastLogged = '' }
    for (const client of [pub, sub]) {
      client.on('error', onError)
      client.on('ready', onReady)
    }
    let closing = false
    // A Redis that hangs (stopped, overloaded) keeps its connections open and "ready": ioredis
    // would queue every command behind the ones it waits for. `unresponsive` is set when a count
    // or a publisher command times out or fails; the adapter is then reported down, its
    // publishes are refused at once (not queued with their payloads; other nodes fill the gap
    // from the event log), and a PING bounded by redisTimeoutMs is sent every second until
    // Redis answers (or a reconnection's ready check succeeds).
    let unresponsive = false
    let recovery: Promise<void> | undefined
    let recoveryTimer: NodeJS.Timeout | undefined
    let pendingPing: Promise<boolean> | undefined
    const pingAnswered = (): Promise<boolean> => {
      // At most one PING in flight: a caller-owned publisher may have no command timeout.
      pendingPing ??= pub.ping().then(() => true, () => false).finally(() => { pendingPing = undefined })
      return withTimeout(pendingPing, options.redisTimeoutMs, false)
    }
    const markUnresponsive = () => {
      if (closing) return
      if (!unresponsive) warn('Redis does not answer', 'Redis adapter unresponsive; reported down until it answers')
      unresponsive = true
      recovery ??= (async () => {
        while (unresponsive && !closing) {
          if (pub.status === 'ready' && await pingAnswered()) {
            markResponsive()
            break
          }
          await new Promise<void>(resolve => { recoveryTimer = setTimeout(resolve, RECOVERY_PING_INTERVAL_MS).unref() })
        }
      })().finally(() => { recovery = undefined })
    }
    const markResponsive = () => {
      if (unresponsive) lastLogged = ''
      unresponsive = false
    }
    pub.on('ready', markResponsive)
    const onPublisherFailure = (err: Error) => {
      if (err.message === 'Command timed out') markUnresponsive()
      warn(err.message, 'Redis publish failed; other nodes fill the gap from the event log')
    }
    const adapterClients = {
      pub: guardCommands(pub, onPublisherFailure, () => closing, () => unresponsive),
      sub: guardCommands(sub, (err) => warn(err.message, 'Redis subscribe failed; retrying when Redis is ready'), () => closing)
    }
    io.adapter(createAdapter(adapterClients.pub, adapterClients.sub, { key: options.redisPrefix }))
    adapterStatus = () => (pub.status === 'ready' && sub.status === 'ready' && !unresponsive ? 'up' : 'down')
    countServers = async () => {
      if (adapterStatus() === 'down') return 1
      try {
        const count = await withTimeout(io.of('/').adapter.serverCount().then(Number), options.redisTimeoutMs, undefined)
        if (count === undefined) {
          markUnresponsive()
          return 1
        }
        markResponsive()
        return Math.max(1, count || 1)
      } catch {
        // Closed or refused while counting: only a hang or a failure of a ready connection counts.
        if (pub.status === 'ready') markUnresponsive()
        return 1
      }
    }
    // Called by the onClose hook below before io.close(): the adapter's unsubscribes then fail
    // quietly instead of being logged as an outage.
    releaseAdapterClients = () => {
      closing = true
      clearTimeout(recoveryTimer)
      pub.off('ready', markResponsive)
      for (const client of [pub, sub]) {
        client.off('error', onError)
        client.off('ready', onReady)
        // Clients the caller passed in stay theirs (open, with their own handlers). Ours get a
        // sink so an error between here and their close cannot crash the process.
        if (ownedClients.includes(client)) client.on('error', () => {})
      }
    }
  }

  const decorator: ErpSocketDecorator = {
    nodeId,
    startedAt: new Date(),
    adapterType,
    redisPrefix: options.redisPrefix,
    adapterStatus: () => adapterStatus(),
    serverCount: () => countServers(),
    corsOrigins: Object.freeze([...options.corsOrigins]),
    originAllowed,
    toOtherNodes (event, ...args) {
      if (adapterType !== 'redis') return
      // Fire and forget: the publish never blocks local delivery, and a failure (Redis down)
      // is logged by the guard; receiving nodes fill the gap from the event log.
      try {
        io.serverSideEmit(event, ...args)
      } catch (err) {
        fastify.log.warn({ err }, `erp-socket: could not send ${event} to other nodes`)
      }
    },
    redisConnection
  }

  fastify.decorate('io', io)
  fastify.decorate('erpSocket', decorator)

  const coalescer = options.coalesceWrites === false ? undefined : coalesceWrites(io, options.coalesceWrites === true ? {} : options.coalesceWrites)

  // Close the connections (not a Socket.IO "server disconnect") so clients reconnect, to
  // another node when there is one, and resume from their last seq.
  fastify.addHook('preClose', async () => {
    closing = true
    io.local.emit('server:shutdown', { message: 'server shutting down, reconnect and resume' })
    await noticeCollected(io)
    await closeConnections(io, upgraded, CLOSE_GRACE_MS)
  })
  fastify.addHook('onClose', async () => {
    fastify.server.off('upgrade', onUpgrade)
    releaseAdapterClients()
    coalescer?.close()
    await io.close()
    await Promise.all(ownedClients.map(client => closeOwnedClient(client, options.redisTimeoutMs)))
  })
}

/** Default `commandTimeout` of the publisher created from a URL. */
const PUBLISHER_COMMAND_TIMEOUT_MS = 2000
/** How often an unresponsive Redis is sent a PING. */
const RECOVERY_PING_INTERVAL_MS = 1000

/**
 * QUIT when Redis answers, bounded by `timeoutMs`; otherwise drop the connection. A QUIT sent
 * during an outage would queue behind the adapter's unsubscribes on the subscriber (which
 * waits for Redis without limit) and never settle, holding the app's close.
 */
async function closeOwnedClient (client: Redis, timeoutMs: number): Promise<void> {
  if (client.status === 'ready') await withTimeout(client.quit().catch(() => {}), timeoutMs, undefined)
  client.disconnect()
}

/** How long close waits for long-polling clients to fetch the `server:shutdown` notice. */
const POLLING_NOTICE_MS = 1000

/** How long close lets connections flush what they were sent (the shutdown notice) before dropping them. */
const CLOSE_GRACE_MS = 1000

interface EngineConnection extends NodeJS.EventEmitter {
  readyState: string
  transport: { name: string }
  close (discard?: boolean): void
}

/**
 * Closes every connection at the transport, not with a Socket.IO disconnect:
 * `disconnectSockets(true)` sends each socket a DISCONNECT packet first, which clients take as
 * a server disconnect ("io server disconnect") and do not reconnect after. Connections still in
 * the handshake (erp-auth's membership query) or not yet in a namespace are closed too, or one
 * that finishes its handshake now would hold server.close(). Waits for them to close, so every
 * socket's 'disconnect' handlers run now, before the other plugins' onClose hooks (presence
 * records the departures): long-polling connections are closed at once (they fetched the notice;
 * otherwise engine.io waits for their next poll, up to 30 s). Then, by `graceMs` after the
 * start, the TCP connections of every upgraded (WebSocket) request still open are destroyed:
 * a client that stopped reading, lost its network or stopped mid-upgrade would otherwise hold
 * the HTTP server's close for ws's 30 s closing handshake, or until its ping timeout.
 */
async function closeConnections (io: ErpServer, upgraded: ReadonlySet<Duplex>, graceMs: number): Promise<void> {
  const deadline = performance.now() + graceMs
  // `clients` is engine.io's (6) map of open connections; its typings mark it protected.
  const conns = Object.values((io.engine as unknown as { clients: Record<string, EngineConnection> }).clients)
  const closed = Promise.all(conns.map(conn => new Promise<void>(resolve => {
    if (conn.readyState === 'closed') return resolve()
    conn.once('close', () => resolve())
  })))
  for (const conn of conns) conn.close(conn.transport.name === 'polling')
  await withTimeout(closed, graceMs, undefined)
  for (const conn of conns) if (conn.readyState !== 'closed') conn.close(true)
  // Healthy WebSocket clients answer the close frame in a moment; the rest are cut.
  while (upgraded.size > 0 && performance.now() < deadline) await new Promise(resolve => setTimeout(resolve, 10))
  for (const socket of upgraded) socket.destroy()
}

/**
 * Resolves once every long-polling client has fetched what it was sent (its next poll; it
 * polls again as soon as an answer arrives), or after POLLING_NOTICE_MS. A WebSocket gets the
 * notice at once, but a polling client between two polls would otherwise lose it: the HTTP
 * server stops accepting its next poll right after this hook.
 */
async function noticeCollected (io: ErpServer): Promise<void> {
  // writeBuffer is engine.io's (6) queue of packets not handed to the transport yet.
  const unsent = (conn: unknown) => (conn as { writeBuffer: unknown[] }).writeBuffer.length > 0
  const conns = new Set([...io.of('/').sockets.values()].map(socket => socket.conn))
  const waiting = [...conns].filter(conn => conn.transport.name === 'polling' && unsent(conn))
  if (waiting.length === 0) return
  const cleanups: Array<() => void> = []
  let timer: NodeJS.Timeout | undefined
  await Promise.race([
    Promise.all(waiting.map(conn => new Promise<void>(resolve => {
      conn.once('drain', resolve)
      conn.once('close', resolve)
      cleanups.push(() => {
        conn.off('drain', resolve)
        conn.off('close', resolve)
      })
    }))),
    new Promise<void>(resolve => { timer = setTimeout(resolve, POLLING_NOTICE_MS).unref() })
  ])
  clearTimeout(timer)
  for (const cleanup of cleanups) cleanup()
}

const SUBSCRIBE_COMMANDS = new Set(['subscribe', 'psubscribe', 'ssubscribe'])
const PUBLISH_COMMANDS = new Set(['publish', 'spublish'])

/**
 * A view of an ioredis client for the Redis adapter. The adapter calls `publish`/`subscribe`
 * without handling the returned promise; while Redis is down ioredis rejects those
 * (maxRetriesPerRequest, enableOfflineQueue: false), and an unhandled rejection ends the
 * process. The view attaches a handler to every command promise; a failed subscribe is sent
 * again once the client is ready, so the node does not stay deaf to the others. While
 * `refusePublishes()` is true, publishes are refused at once (a rejected promise, reported
 * like a failure) instead of being queued behind a Redis that does not answer. The client
 * itself is not modified (it may belong to the caller).
 */
export function guardCommands (client: Redis, onFailure: (err: Error) => void, closing: () => boolean = () => false, refusePublishes: () => boolean = () => false): Redis {
  const wrapped = new Map<PropertyKey, unknown>()
  const view: Redis = new Proxy(client, {
    get (target, property) {
      const value = Reflect.get(target, property, target)
      // `constructor` stays as is: the adapter tells ioredis Cluster apart by its name.
      if (typeof value !== 'function' || property === 'constructor') return value
      let wrapper = wrapped.get(property)
      if (!wrapper) {
        const name = String(property)
        wrapper = function (this: unknown, ...args: unknown[]) {
          if (PUBLISH_COMMANDS.has(name) && refusePublishes()) {
            const refused = Promise.reject(new Error('Redis does not answer: publish refused'))
            refused.catch((err: Error) => { if (!closing()) onFailure(err) })
            return refused
          }
          const result = (Reflect.get(target, property, target) as (...a: unknown[]) => unknown).apply(target, args)
          if (result === target) return this
          if (result instanceof Promise) {
            result.catch((err: Error) => {
              if (closing()) return
              onFailure(err)
              if (SUBSCRIBE_COMMANDS.has(name)) {
                target.once('ready', () => {
                  if (!closing()) (view as unknown as Record<string, (...a: unknown[]) => unknown>)[name]!(...args)
                })
              }
            })
          }
          return result
        }
        wrapped.set(property, wrapper)
      }
      return wrapper
    }
  })
  return view
}

export default fp(erpSocket, { fastify: '5.x', name: 'erp-socket' })
