import { AsyncLocalStorage } from 'node:async_hooks'
import { randomUUID } from 'node:crypto'
import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { z } from 'zod'
import { databaseUnreachable, deleteInBatches, every, parseOptions, refuseTakenDecorators, sqlErrorOf, TEN_YEARS_S, timerMs } from '../support.ts'
import { fenceError, fenceSql, heldClaims } from '../claim-fence.ts'
import { Errors } from '../errors.ts'
import { Prisma, type PrismaClient } from '../../src/generated/prisma/client.ts'
import {
  companyStream, syncResumeSchema, userStream,
  type DomainEventMap, type DomainEventType, type Envelope, type ResumeStreamResult, type Stream
} from '../events.ts'
import { listener, SocketError, type ErpSocket } from '../socket/handle.ts'
import { Dispatcher } from './dispatcher.ts'
import { Semaphore } from './semaphore.ts'

export interface ErpOfflineQueueOptions {
  /** Prisma client holding the `events` and `stream_heads` tables. Required. */
  prisma: PrismaClient
  /** Events older than this are pruned (EVENT_LOG_TTL_SECONDS). Default 86400. */
  ttlSeconds?: number
  /** Events kept per stream (EVENT_LOG_MAXLEN). Default 10000. */
  maxLen?: number
  /** Events per replay page (bounds memory per resuming client). Default 500. */
  pageSize?: number
  /** Replay page reads running at once across all sockets of this node. Default 4. */
  maxConcurrentReads?: number
  /** How often a node checks stream heads, fills gaps and sends `sync:head`; 0 disables. Default 15000. */
  headIntervalMs?: number
  /** How often the retention job runs; 0 disables. Default 60000. */
  pruneIntervalMs?: number
  /** Rows deleted per statement by the retention job; at most 20 statements per run. Default 5000. */
  pruneBatchSize?: number
  /**
   * How long live events are held for a socket that connected with `auth: { resume: true }`
   * and has not yet sent `sync:resume`. Default 10000.
   */
  resumeWindowMs?: number
  /** Live events buffered per held stream before the replay re-reads them from the log instead. Default 10000. */
  maxHeldEvents?: number
  /** Interactive transaction limits for `transaction()`. Defaults 10000 / 15000 ms. */
  transactionMaxWaitMs?: number
  transactionTimeoutMs?: number
  /**
   * How `transaction()` finds a transaction that a failed statement aborted while `fn` caught its
   * error (PostgreSQL then answers the COMMIT with a ROLLBACK, which Prisma does not report, and
   * the events recorded in it would be emitted for nothing). `'statement'` (default): a
   * transaction without a guard ends with a `SELECT 1`, which fails there (one round trip).
   * `'driver'`: the Prisma client's driver refuses to commit an aborted transaction itself, as
   * this project's `openDatabase` PostgreSQL client does (src/db/index.ts): no round trip more.
   */
  abortedCheck?: 'statement' | 'driver'
}

export interface PublishInput<K extends DomainEventType = DomainEventType> {
  stream: Stream
  type: K
  companyId: string
  actorId: string | null
  data: DomainEventMap[K]
}

export interface StatementChange<K extends DomainEventType = DomainEventType> {
  /** Each one INSERT, UPDATE or DELETE without RETURNING (`Prisma.sql`), run in the same statement. */
  writes: [Prisma.Sql, ...Prisma.Sql[]]
  event: PublishInput<K>
  /**
   * A check evaluated once inside the same statement, whatever the writes touch: it aborts the
   * whole statement by raising (nothing written, recorded or emitted). E.g.
   * `fastify.erpAuth.writeGuard(request)`, the membership check of an `in-write` route.
   */
  guard?: WriteGuard
}

export interface TransactionOptions {
  /** A check evaluated in the transaction's last statement, before it commits; raising rolls it all back. */
  guard?: WriteGuard
}

/** A check run inside `eventLog.commit`'s statement (see `StatementChange.guard`), or last in `eventLog.transaction`. */
export interface WriteGuard {
  /** A scalar SQL expression (`Prisma.sql`) that raises to refuse; its value goes to `passed`. */
  sql: Prisma.Sql
  /** Called with the expression's value once the statement has committed. */
  passed?: (value: unknown) => void
  /** Maps the error the statement failed with to the one to throw (undefined: rethrow as is). */
  error?: (err: unknown) => Error | undefined
}

export type Publish = <K extends DomainEventType>(event: PublishInput<K>) => Promise<Envelope<DomainEventMap[K], K>>
export type Tx = Prisma.TransactionClient

export interface EventLog {
  /**
   * Runs `fn` in one database transaction. Events passed to `publish` are recorded in that
   * transaction (contiguous seq per stream) and emitted after it commits; if it rolls back,
   * nothing was recorded and nothing is emitted. With `guard` (e.g.
   * `fastify.erpAuth.writeGuard(request)`), the check is the transaction's last statement,
   * just before its commit (in place of the `SELECT 1` that ends a transaction without one, and
   * beside erp-idempotency's fence): a caller removed while the request waited for a connection, a row lock or a
   * queue commits nothing. A statement that failed in `fn` aborts the transaction even when
   * `fn` catches its error (PostgreSQL then turns the COMMIT into a ROLLBACK, which Prisma does not
   * report): the last statement (or, with `abortedCheck: 'driver'`, the COMMIT) then fails, and
   * `transaction` rejects (with an error saying so,
   * the aborted statement's as its `cause`) instead of resolving, and emitting events, for a
   * change that did not happen.
   */
  transaction<T> (fn: (tx: Tx, publish: Publish) => Promise<T>, options?: TransactionOptions): Promise<T>
  /** Records and emits one event in a transaction of its own. */
  publish: Publish
  /**
   * Runs `writes` and records `event` in one SQL statement (one round trip, atomic without an
   * interactive transaction), then emits the event. The event is recorded only if the first
   * write touched a row; otherwise nothing is recorded or emitted and the result is null.
   */
  commit<K extends DomainEventType> (change: StatementChange<K>): Promise<Envelope<DomainEventMap[K], K> | null>
  /** Events of a stream after `afterSeq`, in order. */
  read (stream: string, afterSeq: number, limit: number): Promise<Envelope[]>
  /** Current head seq of each stream (0 for a stream with no events). */
  heads (streams: string[]): Promise<Map<string, number>>
  /** Runs the retention job once; returns how many events it deleted. */
  prune (): Promise<number>
  /** Checks heads, fills gaps and sends `sync:head` to local listeners once. */
  beacon (): Promise<void>
}

declare module 'fastify' {
  interface FastifyInstance {
    eventLog: EventLog
  }
}

const optionsSchema = z.object({
  prisma: z.custom<PrismaClient>(v => typeof v === 'object' && v !== null && '$transaction' in v, 'must be a PrismaClient'),
  ttlSeconds: z.number().int().min(1).max(TEN_YEARS_S).default(86400),
  maxLen: z.number().int().min(1).default(10000),
  pageSize: z.number().int().min(1).max(10000).default(500),
  maxConcurrentReads: z.number().int().min(1).max(100).default(4),
  headIntervalMs: timerMs(0).default(15000),
  pruneIntervalMs: timerMs(0).default(60000),
  pruneBatchSize: z.number().int().min(1).max(100000).default(5000),
  resumeWindowMs: z.number().int().min(0).max(300000).default(10000),
  maxHeldEvents: z.number().int().min(1).default(10000),
  transactionMaxWaitMs: timerMs(1).default(10000),
  transactionTimeoutMs: timerMs(1).default(15000),
  abortedCheck: z.enum(['statement', 'driver']).default('statement')
}).strict()

const STREAM = /^(company|user):[^:\s]+$/
// A resume's catch-up read that fails is tried this many times, waiting 100, 200... ms between.
const CATCH_UP_ATTEMPTS = 3
const CATCH_UP_RETRY_MS = 100
/** Event names Socket.IO reserves, and the server's own events: never a domain event's type. */
const RESERVED_TYPES = new Set([
  'connect', 'connect_error', 'disconnect', 'disconnecting', 'newListener', 'removeListener',
  'sync:head', 'sync:resume', 'presence:changed', 'presence:set', 'presence:list', 'auth:expired', 'auth:revoked', 'auth:refresh', 'server:shutdown'
])

/** Envelopes relayed per `erp:events` message: a transaction that publishes more goes in several. */
const RELAY_CHUNK = 10_000

/** Envelopes another node relays (`erp:events`): checked before the sequencer believes them. */
const relayedEventsSchema = z.array(z.object({
  id: z.string().min(1).max(200),
  stream: z.string().max(300).regex(STREAM),
  seq: z.number().int().min(1).max(Number.MAX_SAFE_INTEGER),
  type: z.string().min(1).max(200).refine(type => !RESERVED_TYPES.has(type)),
  companyId: z.string().min(1).max(200),
  at: z.string().max(64),
  actor: z.object({ userId: z.string().max(200).nullable() }),
  data: z.unknown()
}).refine(e => !e.stream.startsWith('company:') || e.stream === `company:${e.companyId}`, 'a company stream carries its own company')).max(RELAY_CHUNK)

/**
 * What JSON.stringify writes for a NUL or a lone surrogate (an escape whose backslash is not
 * itself escaped): jsonb refuses both, text refuses NUL.
 */
const UNSTORABLE_JSON = /(?<!\\)(?:\\\\)*\\u(?:0000|d[89a-f][0-9a-f]{2})/

/**
 * A publish's own mistakes, refused before anything is written: a company stream of another
 * company than `companyId`, a type that is a reserved or server event name (it would be emitted
 * as one, or throw in the emit after the commit), data that is not JSON.
 */
function checkEvent (event: PublishInput): void {
  if (typeof event?.stream !== 'string' || !STREAM.test(event.stream)) {
    throw new TypeError(`erp-offline-queue: stream must be company:<id> or user:<id>, got ${JSON.stringify(event?.stream)}`)
  }
  if (event.stream.startsWith('company:') && event.stream !== `company:${event.companyId}`) {
    throw new TypeError(`erp-offline-queue: ${event.stream} is not the stream of company ${event.companyId}`)
  }
  if (typeof event.type !== 'string' || (event.type as string) === '' || RESERVED_TYPES.has(event.type)) {
    throw new TypeError(`erp-offline-queue: ${JSON.stringify(event.type)} cannot be an event type (empty, reserved by Socket.IO, or one of the server's own events)`)
  }
  const json = event.data === undefined ? undefined : JSON.stringify(event.data)
  if (json === undefined) {
    throw new TypeError('erp-offline-queue: event data must be a JSON value')
  }
  // Input more often than a bug (a field of a request body): a 400 through erpErrorHandler.
  if (UNSTORABLE_JSON.test(json) || UNSTORABLE_JSON.test(JSON.stringify([event.stream, event.type, event.companyId, event.actorId ?? null]))) {
    throw new Errors.VALIDATION_FAILED('an event cannot hold NUL (\\u0000) or a lone surrogate: PostgreSQL cannot store them')
  }
}

interface EventRow {
  id: string
  stream: string
  seq: number
  type: string
  companyId: string
  actorId: string | null
  data: unknown
  createdAt: Date
}

type RecordedRow = { seq: number, createdAt: Date }

const toEnvelope = (row: EventRow): Envelope => ({
  id: row.id,
  stream: row.stream as Stream,
  seq: Number(row.seq),
  type: row.type,
  companyId: row.companyId,
  at: new Date(row.createdAt).toISOString(),
  actor: { userId: row.actorId },
  data: row.data
})

const holdRoom = (stream: string) => `hold:${stream}`

/**
 * Streams a beacon handles per event-loop turn. Every socket has its own user stream, so a
 * beacon covers about as many streams as the node has sockets; at 1,000 sockets one pass held
 * the event loop for 6–12 ms (the fanout bench's server, README "Performance" item 12), which a
 * request or a broadcast arriving meanwhile waited out. In slices, they run between them.
 */
const BEACON_SLICE = 128
const nextTurn = () => new Promise<void>(resolve => setImmediate(resolve))

interface Hold {
  buffer: Envelope[]
  overflowed: boolean
}

/** Validates erp-offline-queue's options as registering it does, without registering it; throws naming the option. */
export const checkOfflineQueueOptions = (raw: unknown) => parseOptions('erp-offline-queue', optionsSchema, raw)

async function erpOfflineQueue (fastify: FastifyInstance, rawOptions: ErpOfflineQueueOptions) {
  const options = checkOfflineQueueOptions(rawOptions)
  refuseTakenDecorators(fastify, 'erp-offline-queue', ['eventLog'])
  const { prisma } = options
  const io = fastify.io
  const nsp = io.of('/')
  const reads = new Semaphore(options.maxConcurrentReads)

  // ---- the log ----

  // `head` bumps the stream head (its row lock serialises publishers of the stream until commit,
  // so seq order is commit order); `gate` may skip it. `insertEvent` then records the event with
  // that seq.
  const bumpHead = (event: PublishInput, gate: Prisma.Sql = Prisma.empty) => Prisma.sql`
    head AS (
      INSERT INTO stream_heads (stream, "companyId", seq) SELECT ${event.stream}, ${event.companyId}, 1 ${gate}
      ON CONFLICT (stream) DO UPDATE SET seq = stream_heads.seq + 1
      RETURNING seq
    )`
  const insertEvent = (id: string, event: PublishInput) => Prisma.sql`
    INSERT INTO events (id, stream, seq, type, "companyId", "actorId", data, "createdAt")
    SELECT ${id}, ${event.stream}, head.seq, ${event.type}, ${event.companyId}, ${event.actorId},
           ${JSON.stringify(event.data)}::jsonb, (clock_timestamp() AT TIME ZONE 'UTC')
    FROM head
    RETURNING seq, "createdAt"`

  async function record (tx: Tx, event: PublishInput): Promise<Envelope> {
    const id = randomUUID()
    const [row] = await tx.$queryRaw<RecordedRow[]>`WITH ${bumpHead(event)} ${insertEvent(id, event)}`
    return toEnvelope({ ...event, id, seq: row!.seq, createdAt: row!.createdAt })
  }

  const read = async (stream: string, afterSeq: number, limit: number): Promise<Envelope[]> => {
    const rows = await prisma.$queryRaw<EventRow[]>`
      SELECT id, stream, seq, type, "companyId", "actorId", data, "createdAt"
      FROM events WHERE stream = ${stream} AND seq > ${afterSeq}
      ORDER BY seq LIMIT ${limit}`
    return rows.map(toEnvelope)
  }

  const heads = async (streams: string[]): Promise<Map<string, number>> => {
    const result = new Map<string, number>(streams.map(s => [s, 0]))
    for (let i = 0; i < streams.length; i += 1000) {
      const chunk = streams.slice(i, i + 1000)
      const rows = await prisma.$queryRaw<Array<{ stream: string, seq: number }>>`
        SELECT stream, seq FROM stream_heads WHERE stream = ANY(${chunk}::text[])`
      for (const row of rows) result.set(row.stream, Number(row.seq))
    }
    return result
  }

  // ---- delivery: live events, held sockets ----

  const holds = new Map<string, Map<string, Hold>>()
  /** `<socketId> <stream>` pairs with a sync:resume running. */
  const resuming = new Set<string>()

  const dispatcher = new Dispatcher({
    hasListeners: (stream) => nsp.adapter.rooms.has(stream) || nsp.adapter.rooms.has(holdRoom(stream)),
    deliver (envelope) {
      const held = nsp.adapter.rooms.get(holdRoom(envelope.stream))
      const room = io.local.to(envelope.stream)
      ;(held ? room.except(holdRoom(envelope.stream)) : room).emit(envelope.type as DomainEventType, envelope as never)
      if (!held) return
      for (const socketId of held) {
        const hold = holds.get(socketId)?.get(envelope.stream)
        if (!hold || hold.overflowed) continue
        if (hold.buffer.length >= options.maxHeldEvents) {
          hold.overflowed = true
          hold.buffer = []
        } else {
          hold.buffer.push(envelope)
        }
      }
    }
  }, read, (err, stream) => fastify.log.warn({ err, stream }, 'erp-offline-queue: could not read the event log (a stream head, or events to fill a gap)'), options.pageSize)

  // What other nodes send is checked before the sequencer believes it: a malformed message
  // (another version mid-deploy, another app on the prefix) would otherwise throw in the
  // adapter's async handler (an unhandled rejection ends the process) or, with a high seq,
  // skip a stream ahead and drop its real events.
  let lastRelayWarning = 0
  const onRelayedEvents = (payload: unknown) => {
    const parsed = relayedEventsSchema.safeParse(payload)
    if (!parsed.success) {
      if (Date.now() - lastRelayWarning > 60_000) {
        lastRelayWarning = Date.now()
        fastify.log.warn({ issue: parsed.error.issues[0] }, 'erp-offline-queue: ignored malformed erp:events from another node')
      }
      return
    }
    try {
      dispatcher.ingest(parsed.data as Envelope[])
    } catch (err) {
      fastify.log.error({ err }, 'erp-offline-queue: could not deliver events from another node')
    }
  }
  io.on('erp:events', onRelayedEvents)

  const distribute = (envelopes: Envelope[]) => {
    if (envelopes.length === 0) return
    dispatcher.ingest(envelopes)
    // In chunks the receivers accept: a larger message was refused whole as malformed, and its
    // events reached the other nodes only through their next gap fill.
    for (let i = 0; i < envelopes.length; i += RELAY_CHUNK) {
      fastify.erpSocket.toOtherNodes('erp:events', i === 0 && envelopes.length <= RELAY_CHUNK ? envelopes : envelopes.slice(i, i + RELAY_CHUNK))
    }
  }

  // A publish or commit inside a transaction's callback would open a second transaction that waits
  // for the stream head the first one holds: both stall until the first times out and rolls back,
  // and the second then commits an event for a change that did not happen.
  const insideTransaction = new AsyncLocalStorage<true>()
  const refuseNested = (what: string) => {
    if (insideTransaction.getStore()) {
      throw new Error(`erp-offline-queue: eventLog.${what}() inside eventLog.transaction(): use the publish function the transaction passes to its callback`)
    }
  }

  /**
   * The guard's own error when it refuses now (checked on its own), for work that failed before
   * its turn. Not after an outage (no connection, connection lost): the check would wait for a
   * connection all over again, doubling the time to answer 503.
   */
  const refusal = async (guard: WriteGuard | undefined, err: unknown): Promise<Error | undefined> =>
    guard && !databaseUnreachable(err)
      ? await prisma.$queryRaw`SELECT ${guard.sql}`.then(() => undefined, (guardErr: unknown) => guard.error?.(guardErr))
      : undefined

  // `lastCheck` false: `fn` cannot catch a failed statement (publish()'s own transaction), so the
  // statement that finds an aborted transaction is not needed.
  const run = async <T>(fn: (tx: Tx, publish: Publish) => Promise<T>, { guard }: TransactionOptions, lastCheck: boolean): Promise<T> => {
    refuseNested('transaction')
    const recorded: Envelope[] = []
    const claim = heldClaims.getStore()
    let guarded: unknown
    const result = await prisma.$transaction(async (tx) => {
      const publish = (async (event: PublishInput) => {
        checkEvent(event)
        const envelope = await record(tx, event)
        recorded.push(envelope)
        return envelope
      }) as Publish
      const value = await insideTransaction.run(true, () => fn(tx, publish))
      // Last: the claim's row lock is then held only until the commit that follows, and the
      // guard sees the membership as it is when the work is about to commit.
      if (guard || claim) {
        // The fence first (its UPDATE may wait for the claim's row lock), then the guard, so the
        // guard reads the membership after any wait.
        const [row] = await tx.$queryRaw<Array<{ value: unknown }>>`
          SELECT ${guard?.sql ?? Prisma.sql`NULL`} AS value, fenced FROM (SELECT ${claim ? fenceSql(claim) : Prisma.sql`NULL`} AS fenced OFFSET 0) AS fence`
        guarded = row?.value
      } else if (lastCheck && options.abortedCheck === 'statement') {
        // Fails (25P02) in a transaction aborted by a statement whose error `fn` caught.
        await tx.$executeRaw`SELECT 1`
      }
      return value
    }, { maxWait: options.transactionMaxWaitMs, timeout: options.transactionTimeoutMs })
      .catch(async (err: unknown) => {
        const mapped = (claim && fenceError(err)) ?? guard?.error?.(err)
        if (mapped) throw mapped
        // The work failed before the guard's turn (a 404, a 409 built from what it read): a
        // caller removed while the request waited gets the guard's 403 instead.
        const refused = await refusal(guard, err)
        if (refused) throw refused
        // The last statement found the transaction aborted: say why, not only "aborted".
        if (sqlErrorOf(err)?.code === '25P02') {
          throw new Error('erp-offline-queue: a statement in this transaction failed and its error was caught, so PostgreSQL rolled the whole transaction back and nothing was recorded; let the error propagate, or run the statement under a SAVEPOINT to recover from it', { cause: err })
        }
        throw err
      })
    guard?.passed?.(guarded)
    distribute(recorded)
    return result
  }
  const transaction = <T>(fn: (tx: Tx, publish: Publish) => Promise<T>, options: TransactionOptions = {}): Promise<T> => run(fn, options, true)

  async function commit (change: StatementChange): Promise<Envelope | null> {
    const { event, guard } = change
    refuseNested('commit')
    if (!Array.isArray(change.writes) || change.writes.length === 0) throw new TypeError('erp-offline-queue: commit() needs at least one write')
    checkEvent(event)
    const id = randomUUID()
    // Data-modifying WITH clauses run exactly once, together, in the statement's own transaction.
    const writes = change.writes.map((write, i) => Prisma.sql`${Prisma.raw(`w${i}`)} AS (${write} RETURNING 1)`)
    const clauses = Prisma.join([...writes, bumpHead(event, Prisma.sql`WHERE EXISTS (SELECT 1 FROM w0)`)], ', ')
    // The checks (the Idempotency-Key claim's fence, then the guard) run after every write and
    // the event's insert, which they depend on through `done`: a write waits for row locks (the
    // stream head, held by every transaction publishing to the stream until it commits), and a
    // check made before that wait let a member removed meanwhile commit. The functions read with
    // a snapshot of their own (VOLATILE), so they see what committed during the wait. `done` is
    // one row even when nothing is recorded, so the checks always run (its filter makes the
    // planner compute the counts first: a column nobody reads is never computed); if one raises,
    // the writes roll back with it.
    const claim = heldClaims.getStore()
    const counted = Prisma.join([...change.writes.map((_, i) => Prisma.raw(`(SELECT count(*) FROM w${i})`)), Prisma.raw('(SELECT count(*) FROM recorded)')], ' + ')
    const rows = await prisma.$queryRaw<Array<Partial<RecordedRow> & { guard?: unknown }>>(guard || claim
      ? Prisma.sql`WITH ${clauses}, recorded AS (${insertEvent(id, event)}),
          done AS (SELECT ${counted} AS n),
          checks AS (SELECT ${guard?.sql ?? Prisma.sql`NULL`} AS value, fenced FROM (SELECT ${claim ? fenceSql(claim) : Prisma.sql`NULL`} AS fenced FROM done WHERE n >= 0 OFFSET 0) AS fence)
          SELECT checks.value AS guard, checks.fenced, recorded.seq, recorded."createdAt" FROM checks LEFT JOIN recorded ON true`
      : Prisma.sql`WITH ${clauses} ${insertEvent(id, event)}`
    ).catch(async (err: unknown) => {
      // A write that failed before the checks' turn (a unique violation, say): a caller who is no
      // longer a member gets the guard's 403, not an answer built from the company's data.
      throw (claim && fenceError(err)) ?? guard?.error?.(err) ?? await refusal(guard, err) ?? err
    })
    const row = rows[0]
    guard?.passed?.(row?.guard)
    if (row?.seq == null) return null
    const envelope = toEnvelope({ ...event, id, seq: row.seq, createdAt: row.createdAt! })
    distribute([envelope])
    return envelope
  }

  const hold = (socket: ErpSocket, stream: string): Hold => {
    let perSocket = holds.get(socket.id)
    if (!perSocket) {
      perSocket = new Map()
      holds.set(socket.id, perSocket)
    }
    let state = perSocket.get(stream)
    if (!state) {
      state = { buffer: [], overflowed: false }
      perSocket.set(stream, state)
      socket.join(holdRoom(stream))
    }
    return state
  }

  /**
   * Sends held events after `afterSeq` in order and lets live events through again. With
   * `afterSeq` null (a failed resume) the held events are dropped instead, and `sync:head` says
   * where the stream is. Synchronous.
   */
  const release = (socket: ErpSocket, stream: string, afterSeq: number | null): number => {
    const perSocket = holds.get(socket.id)
    const state = perSocket?.get(stream)
    let last = afterSeq ?? 0
    if (state) {
      for (const envelope of afterSeq === null ? [] : state.buffer) {
        if (envelope.seq <= last) continue
        socket.emit(envelope.type as DomainEventType, envelope as never)
        last = envelope.seq
      }
      // Held events dropped unsent: say where the stream is, so a client that missed the error
      // ack (or has no beacon) sees the gap now rather than at the next event.
      const head = dispatcher.lastDelivered(stream)
      if (afterSeq === null && (state.buffer.length > 0 || state.overflowed) && head !== undefined) {
        socket.emit('sync:head', { stream: stream as Stream, seq: head })
      }
      perSocket!.delete(stream)
      if (perSocket!.size === 0) holds.delete(socket.id)
    }
    socket.leave(holdRoom(stream))
    return last
  }

  // Waits until the connection has flushed its write buffer (bounded memory per resuming
  // client), removing both listeners whichever fires first.
  const waitForDrain = async (socket: ErpSocket) => {
    const conn = socket.conn as unknown as { writeBuffer: unknown[] } & NodeJS.EventEmitter
    if (!socket.connected || conn.writeBuffer.length < 64) return
    await new Promise<void>(resolve => {
      const done = () => {
        conn.off('drain', done)
        conn.off('close', done)
        resolve()
      }
      conn.on('drain', done)
      conn.on('close', done)
    })
  }

  /** How far the held events reach from `cursor` without a hole (null: a hole right after it or further on). */
  const heldRunEnd = (buffer: readonly Envelope[], cursor: number): number | null => {
    let last = cursor
    for (const envelope of buffer) {
      if (envelope.seq <= last) continue
      if (envelope.seq !== last + 1) return null
      last = envelope.seq
    }
    return last
  }

  /**
   * Brings this node's delivery of `stream` up to `cursor` from the log (the other nodes' copies
   * may be late), so events the replay sent are not delivered to the socket a second time when
   * those copies arrive. A read that fails is tried again; if it keeps failing the resume fails
   * (the socket would otherwise get the replayed events again from the next gap fill).
   */
  const catchUpTo = async (stream: string, cursor: number): Promise<void> => {
    for (let attempt = 0; ; attempt++) {
      await dispatcher.catchUp(stream, cursor, { skipUnread: false })
      if ((dispatcher.lastDelivered(stream) ?? cursor) >= cursor) return
      if (attempt === CATCH_UP_ATTEMPTS - 1) {
        throw new SocketError('SERVICE_UNAVAILABLE', `Could not bring ${stream} up to date from the event log; resume again (drop events whose seq you already applied)`)
      }
      await new Promise(resolve => setTimeout(resolve, CATCH_UP_RETRY_MS * (attempt + 1)))
    }
  }

  /**
   * A replay's read, in its turn among `maxConcurrentReads`; skipped (undefined) when the socket
   * left while it waited, e.g. every socket when the app closes during a reconnect storm: those
   * reads would run against a database that is being closed too.
   */
  const readFor = <T>(socket: ErpSocket, fn: () => Promise<T>): Promise<T | undefined> =>
    reads.run(async () => socket.connected ? await fn() : undefined)

  const replay = async (socket: ErpSocket, stream: string, lastSeq: number): Promise<ResumeStreamResult> => {
    const state = hold(socket, stream)
    let cursor = lastSeq
    let replayed = 0
    let released = false
    // Nobody gets the answer: the socket is gone.
    const gone = (): ResumeStreamResult => ({ recovered: false, replayed, headSeq: cursor })
    try {
      const headsRead = await readFor(socket, () => heads([stream]))
      if (!headsRead) return gone()
      const head = headsRead.get(stream) ?? 0
      if (lastSeq > head) {
        throw new SocketError('SYNC_CURSOR_AHEAD', `lastSeq ${lastSeq} is ahead of ${stream} (head ${head}); refetch over REST`)
      }
      // Events after the cursor were pruned: say so instead of leaving a silent gap. The events
      // up to the cursor went out; the client refetches the rest over REST.
      const gap = (): ResumeStreamResult => {
        released = true
        const last = release(socket, stream, Math.max(head, cursor))
        return { recovered: false, replayed, headSeq: Math.max(head, last) }
      }
      let page = lastSeq < head ? await readFor(socket, () => read(stream, cursor, options.pageSize)) : []
      if (!page) return gone()
      if (lastSeq < head && page.length === 0) return gap()
      let holeBeforeRead = false
      for (;;) {
        for (const envelope of page) {
          if (!socket.connected) return gone()
          // Checked for every event, not only the first: a prune can leave a hole inside the
          // range (a batch still under way, or one that ran between two pages).
          if (envelope.seq !== cursor + 1) return gap()
          socket.emit(envelope.type as DomainEventType, envelope as never)
          cursor = envelope.seq
          replayed++
        }
        await waitForDrain(socket)
        if (page.length < options.pageSize && !state.overflowed) {
          // The held events had a hole before this read, and the log has nothing after the
          // cursor: the missing events were pruned.
          if (holeBeforeRead && page.length === 0) return gap()
          // Caught up with the log. Bring this node's live delivery to the cursor first.
          await catchUpTo(stream, cursor)
          // The held events must continue the cursor without a hole: a gap fill of this node
          // that failed skips events, and live delivery goes on after them. Then read on from
          // the log instead of handing over a hole.
          const end = heldRunEnd(state.buffer, cursor)
          if (!state.overflowed && end !== null) {
            // The log and the held events together must reach the head read at the start; what
            // is missing below it was pruned between two pages.
            if (end < head) return gap()
            break
          }
          holeBeforeRead = end === null
        } else {
          holeBeforeRead = false
        }
        // More in the log than one page, too many live events held, or a hole in them: read on from the log.
        state.overflowed = false
        state.buffer = []
        const next = await readFor(socket, () => read(stream, cursor, options.pageSize))
        if (!next) return gone()
        page = next
      }
      released = true
      const last = release(socket, stream, cursor)
      replayed += last - cursor
      return { recovered: true, replayed, headSeq: last }
    } finally {
      // Failed (or gone): the held events are not sent. They may follow a hole the replay did not
      // fill, and they would reach the client ahead of the error ack; it resumes again and reads
      // them from the log.
      if (!released) release(socket, stream, null)
    }
  }

  io.use((socket, next) => {
    const streams = [companyStream(socket.data.companyId), userStream(socket.data.userId)]
    // Follow the socket's streams from their current head before it joins them (see track()).
    // erp-auth read the heads with the membership check (before any join); read them here only
    // if it did not.
    const known = fastify.erpAuth.takeHandshakeHeads(socket)
    Promise.all(streams.map(stream => dispatcher.track(stream, async () => known?.get(stream) ?? (await heads([stream])).get(stream) ?? 0)))
      .then(() => next(), () => next())
  })

  // Shared functions and maps, not closures per connection (see erp-auth).
  const resumeWindows = new Map<string, NodeJS.Timeout>()
  const releaseUnclaimed = (socket: ErpSocket) => {
    resumeWindows.delete(socket.id)
    for (const [stream, state] of [...(holds.get(socket.id) ?? [])]) {
      if (resuming.has(`${socket.id} ${stream}`)) continue
      release(socket, stream, -1)
      // More arrived than could be held, and they were dropped: tell the client where the
      // stream is, so it sees the gap and resumes (or refetches) now, not at the next event.
      const seq = dispatcher.lastDelivered(stream)
      if (state.overflowed && seq !== undefined) socket.emit('sync:head', { stream: stream as Stream, seq })
    }
  }
  function onDisconnect (this: ErpSocket) {
    clearTimeout(resumeWindows.get(this.id))
    resumeWindows.delete(this.id)
    holds.delete(this.id)
  }

  const onResume = listener('sync:resume', syncResumeSchema, async (socket, { streams }) => {
    const own = new Set<string>([companyStream(socket.data.companyId), userStream(socket.data.userId)])
    const requested = Object.entries(streams)
    // Check every stream before sending anything: a refused request leaks nothing.
    for (const [stream] of requested) {
      if (!own.has(stream)) throw new SocketError('SYNC_STREAM_FORBIDDEN', `Stream ${stream} is not one of this connection's streams`)
      if (resuming.has(`${socket.id} ${stream}`)) throw new SocketError('SYNC_IN_PROGRESS', `A resume of ${stream} is already running`)
    }
    for (const [stream] of requested) {
      resuming.add(`${socket.id} ${stream}`)
      hold(socket, stream)
    }
    const results: Record<string, ResumeStreamResult> = {}
    try {
      // A replay hands over up to the whole retained log: not to a socket whose user has left the
      // company since its last membership check (the periodic re-check may be a minute away).
      if (!await fastify.erpAuth.confirmSocket(socket)) {
        throw new SocketError('AUTH_NOT_A_MEMBER', 'No longer an active member of this company')
      }
      for (const [stream, lastSeq] of requested) results[stream] = await replay(socket, stream, lastSeq)
    } finally {
      for (const [stream] of requested) {
        resuming.delete(`${socket.id} ${stream}`)
        // A stream the failed resume did not get to: its held events go unsent too (see replay()).
        if (holds.get(socket.id)?.has(stream)) release(socket, stream, null)
      }
    }
    return { streams: results }
  }, err => fastify.log.error({ err }, 'erp-offline-queue: sync:resume failed'))

  io.on('connection', (socket: ErpSocket) => {
    // Sockets that announce `auth: { resume: true }` are held from the start, so no live event
    // can reach them ahead of the events they missed. Here and not in the middleware: erp-auth
    // joins the streams in this same synchronous emit, so nothing is delivered in between, and
    // a socket that never connects (dropped or refused in a later middleware) gets no
    // 'disconnect' that would forget its holds.
    if (socket.handshake.auth?.resume === true) {
      for (const stream of [companyStream(socket.data.companyId), userStream(socket.data.userId)]) hold(socket, stream)
      const timer = setTimeout(releaseUnclaimed, options.resumeWindowMs, socket)
      timer.unref()
      resumeWindows.set(socket.id, timer)
    }
    socket.on('disconnect', onDisconnect)
    socket.on('sync:resume', onResume)
  })

  // ---- background jobs ----

  const prune = async (): Promise<number> => {
    // The database's clock, which stamped `createdAt`: a node whose clock runs ahead must not prune
    // early. now(), not the volatile clock_timestamp(): a stable bound lets the index on createdAt serve.
    const cutoff = Prisma.sql`((now() AT TIME ZONE 'UTC') - make_interval(secs => ${options.ttlSeconds}))`
    const expired = await deleteInBatches(options.pruneBatchSize, () => prisma.$executeRaw`
      DELETE FROM events WHERE ctid IN (
        SELECT ctid FROM events WHERE "createdAt" < ${cutoff} LIMIT ${options.pruneBatchSize})`)
    const beyondMaxLen = await deleteInBatches(options.pruneBatchSize, () => prisma.$executeRaw`
      DELETE FROM events WHERE ctid IN (
        SELECT e.ctid FROM events e JOIN stream_heads h ON h.stream = e.stream
        WHERE e.seq <= h.seq - ${options.maxLen} LIMIT ${options.pruneBatchSize})`)
    return expired + beyondMaxLen
  }

  // A beacon still going through its slices stops once the app starts closing (preClose: the
  // onClose hooks of every() run before a hook registered here, and wait for the run).
  let closing = false
  fastify.addHook('preClose', async () => { closing = true })
  const beacon = async (): Promise<void> => {
    dispatcher.sweep()
    const streams = [...nsp.adapter.rooms.keys()].filter(room => room.startsWith('company:') || room.startsWith('user:'))
    if (streams.length === 0) return
    const current = [...await heads(streams)]
    for (let i = 0; i < current.length; i += BEACON_SLICE) {
      if (i > 0) await nextTurn()
      if (closing) return
      await Promise.all(current.slice(i, i + BEACON_SLICE).map(async ([stream, head]) => {
        await dispatcher.catchUp(stream, head)
        const held = nsp.adapter.rooms.has(holdRoom(stream))
        const room = io.local.to(stream)
        ;(held ? room.except(holdRoom(stream)) : room).emit('sync:head', { stream: stream as Stream, seq: head })
      }))
    }
  }

  every(fastify, options.headIntervalMs, 'erp-offline-queue: sync:head beacon', beacon)
  every(fastify, options.pruneIntervalMs, 'erp-offline-queue: retention job', prune)
  // The sequencer forgets streams nobody here listens to, even when beacons are disabled.
  every(fastify, 60_000, 'erp-offline-queue: sequencer sweep', async () => dispatcher.sweep())

  fastify.decorate('eventLog', {
    transaction,
    publish: ((event: PublishInput) => run((_tx, publish) => publish(event), {}, false)) as Publish,
    commit: commit as EventLog['commit'],
    read,
    heads,
    prune,
    beacon
  } satisfies EventLog)
}

export default fp(erpOfflineQueue, { fastify: '5.x', name: 'erp-offline-queue', dependencies: ['erp-socket', 'erp-auth'] })
