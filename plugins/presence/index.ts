import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { Redis, type RedisOptions } from 'ioredis'
import { z } from 'zod'
import { parseOptions, withTimeout, refuseTakenDecorators, timerMs } from '../support.ts'
import {
  companyStream, presenceSetSchema,
  type PresenceChanged, type PresenceEntry, type Viewing
} from '../events.ts'
import { listener, SocketError, type ErpSocket } from '../socket/handle.ts'
import { MemoryPresenceStore } from './memory-store.ts'
import { RedisPresenceStore } from './redis-store.ts'
import { PartialSweepError, sameViewing, type Expired, type PresenceStore, type SocketRef, type UserPresence } from './store.ts'

export { MemoryPresenceStore, RedisPresenceStore }
export type { Change, Departure, Expired, Offline, PresenceStore, SocketRef, Transition, UserPresence } from './store.ts'
export { PartialSweepError } from './store.ts'

export interface RedisPresenceStoreOption {
  /** A `redis://` / `rediss://` URL (the plugin opens and closes its own connection) or an ioredis client you own (never closed). */
  redis: string | Redis
  /** Prefix of every presence key, so several apps can share one Redis. Default `'erp-realtime:presence'`. */
  prefix?: string
  /** ioredis options for a connection opened from a URL, over the defaults `{ maxRetriesPerRequest: 2, commandTimeout: 2000 }`. */
  redisOptions?: RedisOptions
}

export interface ErpPresenceOptions {
  /**
   * Where presence lives: `'memory'` (one node; refused when erp-socket uses Redis), `{ redis }`
   * (shared by every node on that Redis), or your own `PresenceStore` (not closed by the plugin).
   * Default: `'memory'` on erp-socket's memory adapter; on its Redis adapter, a Redis store on a
   * connection of its own to that Redis, keys under `<redisPrefix>:presence`.
   */
  store?: 'memory' | RedisPresenceStoreOption | PresenceStore
  /** How long a user stays present after the last device drops (PRESENCE_GRACE_MS). Default 5000. */
  graceMs?: number
  /** How often a node refreshes its sockets' entries. Default 10000. */
  heartbeatMs?: number
  /**
   * How long an entry lives without a heartbeat: the users of a node that dies without cleaning
   * up go offline this long after its last heartbeat (plus up to `sweepIntervalMs`). At least
   * twice `heartbeatMs`. Default 30000.
   */
  ttlMs?: number
  /** How often a node looks for expired entries (a cheap indexed read). Default 1000. */
  sweepIntervalMs?: number
  /** Expired entries claimed per store call during a sweep. Default 500. */
  sweepBatchSize?: number
  /**
   * How many users' last announced `rev` a node remembers, to drop announcements that reach it
   * after a newer one (from another node, through Redis). Least recently announced users are
   * forgotten first; a user who went offline is forgotten `ttlMs` after it. Default 100000.
   */
  revCacheSize?: number
  /**
   * Changes are delivered to a company's sockets together, at most this many ms after they are
   * announced: in a login or reconnect storm each client gets one write per window instead of
   * one per arrival. Every change is still sent, in order. 0 delivers each change at once.
   * Default 50.
   */
  batchMs?: number
}

export interface ErpPresenceDecorator {
  readonly store: PresenceStore
  /** Who is present in a company (users in their grace period included, with `devices: 0`). */
  list (companyId: string): Promise<PresenceEntry[]>
  /** Refreshes this node's entries now (normally every `heartbeatMs`). */
  heartbeat (): Promise<void>
  /** Claims and announces expired entries now (normally every `sweepIntervalMs`); returns how many. */
  sweep (): Promise<number>
  /**
   * Makes this node behave as if it had crashed: heartbeat, sweep and grace timers stop and its
   * sockets' entries are left in the store for the other nodes to expire. For tests and drills.
   */
  abandon (): void
}

declare module 'fastify' {
  interface FastifyInstance {
    presence: ErpPresenceDecorator
  }
}

const isStore = (value: unknown): value is PresenceStore =>
  typeof value === 'object' && value !== null &&
  ['connect', 'disconnect', 'set', 'endGrace', 'refresh', 'sweep', 'list', 'close']
    .every(method => typeof (value as Record<string, unknown>)[method] === 'function')

const optionsSchema = z.object({
  store: z.union([
    z.literal('memory'),
    z.object({
      redis: z.union([
        z.string().regex(/^rediss?:\/\//, 'must be a redis:// or rediss:// URL'),
        z.custom<Redis>(v => v instanceof Redis, 'must be a redis:// URL or an ioredis client')
      ]),
      prefix: z.string().min(1).max(100).optional(),
      redisOptions: z.record(z.string(), z.unknown()).optional()
    }).strict(),
    z.custom<PresenceStore>(isStore, "must be 'memory', { redis } or a PresenceStore")
  ]).optional(),
  graceMs: z.number().int().min(0).max(3_600_000).default(5000),
  heartbeatMs: timerMs(10).default(10000),
  ttlMs: timerMs(20).default(30000),
  sweepIntervalMs: timerMs(10).default(1000),
  sweepBatchSize: z.number().int().min(1).max(10000).default(500),
  revCacheSize: z.number().int().min(1).max(10_000_000).default(100_000),
  batchMs: z.number().int().min(0).max(10_000).default(50)
}).strict().refine(o => o.ttlMs >= 2 * o.heartbeatMs, { message: 'must be at least twice heartbeatMs', path: ['ttlMs'] })

/** A grace period's end that failed is asked again this many times in all, this long apart. */
const GRACE_END_ATTEMPTS = 10
const GRACE_END_RETRY_MS = 3000
/** `presence:set` calls of one socket that may wait for the store at once; more answer RATE_LIMITED. */
const MAX_PENDING_SETS = 8
/** Sweep batches per run, so a backlog after an outage drains without one run monopolising the node. */
const MAX_SWEEP_BATCHES = 20
// How long close waits for the store updates of the sockets it disconnected.
const CLOSE_WAIT_MS = 2000

const append = <T>(lists: Map<string, T[]>, key: string, item: T): void => {
  const list = lists.get(key)
  if (list) list.push(item)
  else lists.set(key, [item])
}

/**
 * Refuses the 'memory' store when erp-socket's rooms span nodes through Redis: each node would
 * keep its own presence and relay its announcements, so users would show offline on one node
 * while online on another.
 */
export function refuseMemoryOnRedis (store: unknown, adapterIsRedis: boolean): void {
  if (store === 'memory' && adapterIsRedis) {
    throw new Error("erp-presence: the 'memory' store keeps presence on this node, but erp-socket shares rooms across nodes through Redis: users would show offline on one node while online on another. Leave `store` unset (presence then uses the adapter's Redis), or pass { redis } or your own PresenceStore")
  }
}

/** Validates erp-presence's options as registering it does, without registering it; throws naming the option. */
export const checkPresenceOptions = (raw: unknown) => parseOptions('erp-presence', optionsSchema, raw)

async function erpPresence (fastify: FastifyInstance, rawOptions: ErpPresenceOptions) {
  const parsed = { data: checkPresenceOptions(rawOptions) }
  refuseTakenDecorators(fastify, 'erp-presence', ['presence'])
  const { graceMs, heartbeatMs, ttlMs, sweepIntervalMs, sweepBatchSize, revCacheSize, batchMs } = parsed.data
  const storeOption = parsed.data.store
  const shared = fastify.erpSocket.adapterType === 'redis'
  refuseMemoryOnRedis(storeOption, shared)
  const onError = (err: Error) => fastify.log.warn({ err: err.message }, 'erp-presence: Redis connection error')
  const ownsStore = storeOption === undefined || storeOption === 'memory' || !isStore(storeOption)
  const store: PresenceStore = storeOption === undefined
    // Unset: one node's memory, or the adapter's Redis when rooms span nodes.
    ? shared
      // Presence's own defaults over the publisher's options (a caller's client may have no
      // command timeout, or wait for Redis without limit): a hung Redis fails a call in 2 s.
      ? new RedisPresenceStore({
        redis: fastify.erpSocket.redisConnection!({ commandTimeout: 2000, maxRetriesPerRequest: 2, enableOfflineQueue: true }),
        ownsClient: true,
        prefix: `${fastify.erpSocket.redisPrefix}:presence`,
        onError
      })
      : new MemoryPresenceStore()
    : storeOption === 'memory'
      ? new MemoryPresenceStore()
      : isStore(storeOption)
        ? storeOption
        : new RedisPresenceStore({ redis: storeOption.redis, prefix: storeOption.prefix, redisOptions: storeOption.redisOptions as RedisOptions | undefined, onError })

  const io = fastify.io

  interface LocalSocket {
    ref: SocketRef
    /** Store operations of one socket run in order (connect before set before disconnect). */
    chain: Promise<unknown>
    /** The store's epoch when the socket was last recorded (see Transition.epoch). */
    epoch?: string
    /** `presence:set` calls of this socket not yet answered. */
    sets: number
  }
  const local = new Map<string, LocalSocket>()
  const graceTimers = new Map<string, NodeJS.Timeout>()
  const pending = new Set<Promise<unknown>>()
  /** False once the node closes or is abandoned: no new store work, no new timers. */
  let active = true

  const track = <T>(work: Promise<T>): Promise<T> => {
    pending.add(work)
    const done = () => { pending.delete(work) }
    work.then(done, done)
    return work
  }
  const enqueue = <T>(entry: LocalSocket, fn: () => Promise<T>): Promise<T> => {
    const work = entry.chain.then(fn)
    entry.chain = work.catch(() => {})
    return track(work)
  }

  // Repeated failures (Redis down) are logged once per distinct message until work succeeds again.
  let lastFailure = ''
  const failed = (what: string) => (err: unknown) => {
    const message = err instanceof Error ? err.message : String(err)
    if (message === lastFailure) return
    lastFailure = message
    fastify.log.warn({ err }, `erp-presence: ${what} failed`)
  }
  const succeeded = () => { lastFailure = '' }

  const toChange = (userId: string, presence: UserPresence | null, rev: number): PresenceChanged => {
    const at = new Date().toISOString()
    if (!presence) return { userId, status: 'offline', devices: 0, at, rev }
    const change: PresenceChanged = { userId, status: presence.status, devices: presence.devices, at, rev }
    if (presence.viewing) change.viewing = presence.viewing
    return change
  }

  const graceKey = (ref: { companyId: string, userId: string }) => `${ref.companyId}\u0000${ref.userId}`

  /*
   * Announcements of one user can be made by different nodes (each reports the store operations
   * it ran) and reach a node in any order: its own at once, the others' through Redis. Each node
   * therefore delivers to its sockets only what is newer than the last rev it delivered for that
   * user, so its clients never apply a stale state over a newer one.
   */
  /** Last delivered rev per user (graceKey), least recently delivered first. */
  const delivered = new Map<string, number>()
  /** When an offline was delivered, per user, oldest first; forgotten `ttlMs` later. */
  const offlineAt = new Map<string, number>()

  const deliver = (companyId: string, change: PresenceChanged): void => {
    const now = Date.now()
    for (const [key, at] of offlineAt) {
      if (now - at < ttlMs) break
      offlineAt.delete(key)
      delivered.delete(key)
    }
    const key = graceKey({ companyId, userId: change.userId })
    const last = delivered.get(key)
    if (last !== undefined && change.rev <= last) return
    delivered.delete(key) // re-inserted last: the map stays in least-recently-delivered order
    delivered.set(key, change.rev)
    offlineAt.delete(key)
    if (change.status === 'offline') offlineAt.set(key, now)
    if (delivered.size > revCacheSize) {
      const oldest = delivered.keys().next().value as string
      delivered.delete(oldest)
      offlineAt.delete(oldest)
    }
    // Once stopped (closing, abandoned) no timer is started: what still arrives goes out at once.
    if (batchMs === 0 || !active) {
      io.local.to(companyStream(companyId)).emit('presence:changed', change)
      return
    }
    append(batched, companyId, { change, tick: ++changeTick })
    if (!batchTimer) {
      batchTimer = setTimeout(deliverBatched, batchMs)
      batchTimer.unref()
    }
  }

  /**
   * Changes waiting for the end of the window, per company, in the order they were made (already
   * rev-checked), each with its place in the order of changes and joins (`tick`).
   */
  const batched = new Map<string, Array<{ change: PresenceChanged, tick: number }>>()
  /**
   * Sockets that joined a company while changes of it were waiting, with the last tick before
   * they joined: a change made before a socket joined is not sent to it at the end of the window
   * (what it was, `presence:list` tells; without this, a company's login storm would send each
   * newcomer the arrivals before its own too, about 40 % more frames for companies of 100).
   */
  const joinedDuringWindow = new Map<string, Array<{ socketId: string, tick: number }>>()
  let changeTick = 0
  let batchTimer: NodeJS.Timeout | undefined
  const deliverBatched = () => {
    batchTimer = undefined
    for (const [companyId, changes] of batched) {
      const room = io.local.to(companyStream(companyId))
      const joined = joinedDuringWindow.get(companyId)
      for (const { change, tick } of changes) {
        const notYetThere = joined?.filter(j => j.tick >= tick).map(j => j.socketId)
        ;(notYetThere?.length ? room.except(notYetThere) : room).emit('presence:changed', change)
      }
    }
    batched.clear()
    joinedDuringWindow.clear()
  }

  const announce = (companyId: string, userId: string, presence: UserPresence | null, rev: number) => {
    const change = toChange(userId, presence, rev)
    deliver(companyId, change)
    fastify.erpSocket.toOtherNodes('erp:presence', { companyId, change })
  }

  const onRelayed = (relayed: { companyId: string, change: PresenceChanged }) => {
    const change = relayed?.change
    if (typeof relayed?.companyId !== 'string' || typeof change?.userId !== 'string' || !Number.isSafeInteger(change.rev)) {
      fastify.log.warn({ relayed }, 'erp-presence: ignored a malformed presence announcement from another node')
      return
    }
    deliver(relayed.companyId, change)
  }
  io.on('erp:presence', onRelayed)

  const cancelGrace = (ref: SocketRef) => {
    const key = graceKey(ref)
    clearTimeout(graceTimers.get(key))
    graceTimers.delete(key)
  }
  const startGrace = (ref: SocketRef, graceUntil: number, epoch: string | undefined, delayMs = graceMs, attempt = 1) => {
    if (!active) return
    const key = graceKey(ref)
    clearTimeout(graceTimers.get(key))
    const timer = setTimeout(() => {
      graceTimers.delete(key)
      // Another node's sweep may have claimed it first; endGrace answers with a rev to one caller only.
      track(store.endGrace(ref.companyId, ref.userId, graceUntil, epoch)).then(offline => {
        succeeded()
        if (offline) announce(ref.companyId, ref.userId, null, offline.rev)
      }, (err: unknown) => {
        failed('ending a grace period')(err)
        // Its script may still have run (a reply later than every try): the entry and the user are
        // then gone, no sweep will claim them, and only this node can still announce the offline.
        // Asked again, the store answers it (the user unknown, no sweep's claim), or nothing if the
        // user came back meanwhile (a reconnect here cancels this timer too). Not when a newer
        // grace period of the user started here meanwhile: its own timer ends it.
        if (attempt < GRACE_END_ATTEMPTS && !graceTimers.has(key)) startGrace(ref, graceUntil, epoch, GRACE_END_RETRY_MS, attempt + 1)
      })
    }, delayMs)
    timer.unref()
    graceTimers.set(key, timer)
  }

  const register = async (entry: LocalSocket): Promise<void> => {
    const { ref } = entry
    const { before, after, epoch } = await store.connect(ref, ttlMs)
    entry.epoch = epoch
    cancelGrace(ref)
    // A device back within the grace period (devices 0 → 1) changes nothing the company saw.
    if (before === null || (before.devices > 0 && before.devices !== after.devices)) announce(ref.companyId, ref.userId, after, after.rev)
  }

  const unregister = async ({ ref, epoch }: LocalSocket): Promise<void> => {
    const departure = await store.disconnect(ref, graceMs, epoch)
    if (!departure) return
    // The store lost its data since this socket was recorded: nobody else knows the user left.
    if (departure.after === null) announce(ref.companyId, ref.userId, null, departure.rev)
    else if (departure.graceUntil === undefined) announce(ref.companyId, ref.userId, departure.after, departure.after.rev)
    else startGrace(ref, departure.graceUntil, epoch)
  }

  const setPresence = async (entry: LocalSocket, status: UserPresence['status'], viewing: Viewing | null | undefined): Promise<void> => {
    const { ref } = entry
    let transition = await store.set(ref.companyId, ref.userId, { status, viewing })
    if (!transition) {
      // The entry expired under us (e.g. this node was cut off from Redis longer than the TTL).
      await register(entry)
      transition = await store.set(ref.companyId, ref.userId, { status, viewing })
      if (!transition) throw new SocketError('SERVICE_UNAVAILABLE', 'Presence could not be recorded; try again')
    }
    const { before, after } = transition
    if (before.status !== after.status || !sameViewing(before.viewing, after.viewing)) announce(ref.companyId, ref.userId, after, after.rev)
  }

  const list = async (companyId: string): Promise<PresenceEntry[]> => {
    const users = await store.list(companyId)
    users.sort((a, b) => (a.userId < b.userId ? -1 : a.userId > b.userId ? 1 : 0))
    return users.map(({ userId, status, devices, viewing, since, rev }) => {
      const entry: PresenceEntry = { userId, status, devices, since: new Date(since).toISOString(), rev }
      if (viewing) entry.viewing = viewing
      return entry
    })
  }

  // A store failure reaches the client as a retryable code, not as INTERNAL.
  const unavailable = (err: unknown): never => {
    if (err instanceof SocketError) throw err
    failed('a presence request')(err)
    throw new SocketError('SERVICE_UNAVAILABLE', 'Presence is unavailable; try again')
  }

  // Shared listeners (the socket is `this`), not closures per connection (see erp-auth).
  const onSet = listener('presence:set', presenceSetSchema, async (socket, { status, viewing }) => {
    const entry = local.get(socket.id)
    if (!active || !entry) throw new SocketError('SERVICE_UNAVAILABLE', 'This node is shutting down')
    // Bounded: each waits in the socket's queue (memory) and is a store write.
    if (entry.sets >= MAX_PENDING_SETS) throw new SocketError('RATE_LIMITED', `More than ${MAX_PENDING_SETS} presence changes are waiting; send the next once they are acked`)
    entry.sets++
    try {
      await enqueue(entry, () => setPresence(entry, status, viewing)).catch(unavailable)
    } finally {
      entry.sets--
    }
    return {}
  }, err => fastify.log.error({ err }, 'erp-presence: presence:set failed'))

  const onList = listener('presence:list', null, async (socket) => {
    // Own company only: the company comes from the authenticated handshake, never the client.
    const users = await list(socket.data.companyId).catch(unavailable)
    return { users }
  }, err => fastify.log.error({ err }, 'erp-presence: presence:list failed'))

  function onDisconnect (this: ErpSocket) {
    const entry = local.get(this.id)
    local.delete(this.id)
    if (!active || !entry) return
    enqueue(entry, () => unregister(entry)).then(succeeded, failed('recording a disconnection'))
  }

  const onConnection = (socket: ErpSocket) => {
    const { companyId, userId } = socket.data
    if (!active || !companyId || !userId) return
    const entry: LocalSocket = { ref: { companyId, userId, socketId: socket.id }, chain: Promise.resolve(), sets: 0 }
    local.set(socket.id, entry)
    if (batched.has(companyId)) append(joinedDuringWindow, companyId, { socketId: socket.id, tick: changeTick })
    enqueue(entry, () => register(entry)).then(succeeded, failed('recording a connection'))
    socket.on('presence:set', onSet)
    socket.on('presence:list', onList)
    socket.on('disconnect', onDisconnect)
  }
  io.on('connection', onConnection)

  let heartbeatRunning = false
  const heartbeat = async (): Promise<void> => {
    if (heartbeatRunning || !active || local.size === 0) return
    heartbeatRunning = true
    try {
      const missing = await track(store.refresh([...local.values()].map(entry => entry.ref), ttlMs))
      // Entries swept while this node could not refresh them (it was cut off or stalled): re-add.
      for (const ref of missing) {
        const entry = local.get(ref.socketId)
        if (entry && active) enqueue(entry, () => register(entry)).then(succeeded, failed('re-recording a connection'))
      }
    } finally {
      heartbeatRunning = false
    }
  }

  const announceExpired = (expired: Expired[]): void => {
    // Several sockets of one user may expire together: announce only where they ended up.
    const last = new Map<string, Expired>()
    for (const item of expired) {
      const key = graceKey(item)
      if (item.rev > (last.get(key)?.rev ?? -1)) last.set(key, item)
    }
    for (const item of last.values()) announce(item.companyId, item.userId, item.after, item.rev)
  }
  let sweepRunning = false
  const sweep = async (): Promise<number> => {
    if (sweepRunning || !active) return 0
    sweepRunning = true
    let claimed = 0
    try {
      for (let batch = 0; batch < MAX_SWEEP_BATCHES && active; batch++) {
        let expired: Expired[]
        try {
          expired = await track(store.sweep(sweepBatchSize))
        } catch (err) {
          // The claims that did succeed removed their entries: announce them, then report.
          if (err instanceof PartialSweepError) announceExpired(err.claimed)
          throw err
        }
        claimed += expired.length
        announceExpired(expired)
        if (expired.length < sweepBatchSize) break
      }
    } finally {
      sweepRunning = false
    }
    return claimed
  }

  const heartbeatTimer = setInterval(() => { heartbeat().then(succeeded, failed('heartbeat')) }, heartbeatMs)
  heartbeatTimer.unref()
  const sweepTimer = setInterval(() => { sweep().then(succeeded, failed('sweep')) }, sweepIntervalMs)
  sweepTimer.unref()

  const stop = () => {
    active = false
    clearInterval(heartbeatTimer)
    clearInterval(sweepTimer)
    for (const timer of graceTimers.values()) clearTimeout(timer)
    graceTimers.clear()
    // Presence is live state: an undelivered change is not worth delaying shutdown for (clients
    // list again when they reconnect).
    clearTimeout(batchTimer)
    batchTimer = undefined
    batched.clear()
    joinedDuringWindow.clear()
  }

  fastify.decorate('presence', {
    store,
    list,
    heartbeat,
    sweep,
    abandon () {
      stop()
      local.clear()
    }
  } satisfies ErpPresenceDecorator)

  fastify.addHook('onClose', async () => {
    io.off('connection', onConnection)
    io.off('erp:presence', onRelayed)
    // Sockets were disconnected in preClose; let their store updates land, for at most
    // CLOSE_WAIT_MS: a store that stopped answering (a Redis client passed in without a
    // commandTimeout, a custom store) must not hold close. Their grace periods stay in the
    // store, where the other nodes' sweeps end them; updates that did not land are left to the
    // other nodes' sweeps too (the sockets' entries expire after ttlMs).
    stop()
    await withTimeout(Promise.allSettled([...pending]), CLOSE_WAIT_MS, undefined)
    local.clear()
    delivered.clear()
    offlineAt.clear()
    if (ownsStore) await store.close()
  })
}

export default fp(erpPresence, { fastify: '5.x', name: 'erp-presence', dependencies: ['erp-socket', 'erp-auth'] })
