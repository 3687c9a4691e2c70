import { createHash, randomUUID } from 'node:crypto'
import fp from 'fastify-plugin'
import type { FastifyInstance, FastifyReply, FastifyRequest, HTTPMethods, onSendHookHandler, preHandlerHookHandler } from 'fastify'
import { z } from 'zod'
import { deleteInBatches, every, hookList, ifMatchVersion, parseOptions, refuseTakenDecorators, timerMs } from '../support.ts'
import { Prisma, type PrismaClient } from '../../src/generated/prisma/client.ts'
import { Errors } from '../errors.ts'
import { heldClaims, type HeldClaim } from '../claim-fence.ts'

/**
 * `Idempotency-Key` for authenticated POST/PATCH/PUT routes (mobile outboxes retry).
 *
 * - The first request with a key claims it: a placeholder row is inserted into
 *   `idempotency_records` (primary key company, user, key) with `INSERT ... ON CONFLICT DO
 *   NOTHING`, so of any number of concurrent requests exactly one executes.
 * - Its response is stored in `onSend`, before the client can see it, for `ttlSeconds`.
 *   Responses with a status below 500 are stored, business errors included (a 409 CONFLICT is
 *   replayed as a 409, like Stripe does); a 5xx releases the key, so a retry executes again.
 * - A retry with the same key and the same request (hash of method, URL and canonical JSON
 *   body) gets the stored status and body byte for byte, with `Idempotent-Replayed: true`,
 *   and changes nothing. A retry that arrives while the first is still running waits for its
 *   response up to `waitMs`, then answers 409 IDEMPOTENCY_KEY_IN_PROGRESS.
 * - The same key with a different request answers 422 IDEMPOTENCY_KEY_REUSED; a malformed
 *   key (not 1..255 visible ASCII characters) 400 IDEMPOTENCY_KEY_INVALID.
 * - A claim whose request never stored a response (its process died mid-request) stays "in
 *   progress" until it expires, unless `recoverAfterMs` is set. Then, once the claim is that
 *   old, a retry finds out whether the change committed: the request's eventLog writes mark the
 *   claim committed in their own transaction (`../claim-fence.ts`). Not committed: the retry
 *   takes the claim over and runs; the first request, should it still be alive, can then write
 *   nothing (its eventLog write answers 409 IDEMPOTENCY_KEY_TAKEN_OVER). Committed: the retry
 *   answers 409 IDEMPOTENCY_KEY_RESPONSE_LOST (read the state, do not run it again).
 *
 * Hooks are added to every POST/PATCH/PUT route registered after this plugin (onRoute), as
 * route-level hooks, so they run after the route's own `authenticate` preHandler. Routes
 * without `request.user` (login) are not covered; a route opts out with
 * `config: { idempotency: false }`.
 */
export interface ErpIdempotencyOptions {
  /** Prisma client holding the `idempotency_records` table. Required. */
  prisma: PrismaClient
  /** How long a stored response is replayed. Default 86400 (24 h). */
  ttlSeconds?: number
  /** How long a retry waits for the first request with its key to finish; then 409 IDEMPOTENCY_KEY_IN_PROGRESS. 0 answers at once. Default 10000. */
  waitMs?: number
  /** How often a waiting retry looks for the stored response. Default 50. */
  pollIntervalMs?: number
  /**
   * How old an unanswered claim must be before a retry may recover it (see above); 0 never
   * recovers (a retry answers IN_PROGRESS until the claim expires). Default 0. Set it only when
   * every covered route writes through `fastify.eventLog` (whose writes are fenced): a route that
   * writes otherwise could apply a change twice after a crash.
   */
  recoverAfterMs?: number
  /** How often expired records are pruned; 0 disables. Default 600000. */
  pruneIntervalMs?: number
  /** Rows deleted per statement by the pruning job; at most 10 statements per run. Default 5000. */
  pruneBatchSize?: number
}

export interface Idempotency {
  /** Runs the pruning job once; returns how many expired records it deleted. */
  prune (): Promise<number>
}

declare module 'fastify' {
  interface FastifyInstance {
    idempotency: Idempotency
  }
  interface FastifyContextConfig {
    /** Set to false to exempt a POST/PATCH/PUT route from Idempotency-Key handling. */
    idempotency?: boolean
  }
}

const optionsSchema = z.object({
  prisma: z.custom<PrismaClient>(v => typeof v === 'object' && v !== null && '$queryRaw' in v, 'must be a PrismaClient'),
  ttlSeconds: z.number().int().min(1).max(30 * 24 * 3600).default(86400),
  waitMs: z.number().int().min(0).max(120_000).default(10_000),
  pollIntervalMs: z.number().int().min(1).max(10_000).default(50),
  recoverAfterMs: z.number().int().min(0).max(24 * 3600 * 1000).default(0),
  pruneIntervalMs: timerMs(0).default(600_000),
  pruneBatchSize: z.number().int().min(1).max(100_000).default(5000)
}).strict()

const METHODS = new Set<string>(['POST', 'PATCH', 'PUT'])
const KEY = /^[\x21-\x7e]{1,255}$/
/** statusCode of a claimed key whose response is not stored yet. */
const IN_PROGRESS = 0

/** Nesting deeper than this is refused (400) before it is hashed: the recursion has a stack to fit in. */
const MAX_BODY_DEPTH = 512

/** JSON with object keys sorted, so a retry serialised in another key order hashes the same. */
function canonical (value: unknown, depth = 0): string {
  if (depth > MAX_BODY_DEPTH) throw new Errors.VALIDATION_FAILED(`the body is nested deeper than ${MAX_BODY_DEPTH} levels`)
  if (Array.isArray(value)) return `[${value.map(item => canonical(item, depth + 1)).join(',')}]`
  if (value !== null && typeof value === 'object') {
    const entries = Object.keys(value).sort().map(k => `${JSON.stringify(k)}:${canonical((value as Record<string, unknown>)[k], depth + 1)}`)
    return `{${entries.join(',')}}`
  }
  return JSON.stringify(value) ?? 'null'
}

/**
 * What is stored in `body`: the payload exactly as sent, and its content type. A Buffer, or text
 * with a NUL (which jsonb cannot hold), is stored as base64 so it replays byte for byte.
 */
interface StoredBody { contentType: string | null, payload: string, encoding?: 'base64' }

function storedPayload (payload: string | Buffer | null | undefined): Pick<StoredBody, 'payload' | 'encoding'> {
  if (payload === undefined || payload === null) return { payload: '' }
  if (typeof payload === 'string' && !payload.includes('\u0000')) return { payload }
  return { payload: (Buffer.isBuffer(payload) ? payload : Buffer.from(payload, 'utf8')).toString('base64'), encoding: 'base64' }
}

type Claim = Omit<HeldClaim, 'token'>

interface RecordRow {
  requestHash: string
  statusCode: number
  body: StoredBody | null
  expired: boolean
  token: string | null
  /** Unanswered past `recoverAfterMs`. */
  stale: boolean | null
  committed: boolean
  /** Committed more than `recoverAfterMs` ago. */
  committedLongAgo: boolean | null
}

const sleep = (ms: number) => new Promise(resolve => setTimeout(resolve, ms))

/** Validates erp-idempotency's options as registering it does, without registering it; throws naming the option. */
export const checkIdempotencyOptions = (raw: unknown) => parseOptions('erp-idempotency', optionsSchema, raw)

async function erpIdempotency (fastify: FastifyInstance, rawOptions: ErpIdempotencyOptions) {
  const { prisma, ttlSeconds, waitMs, pollIntervalMs, recoverAfterMs, pruneIntervalMs, pruneBatchSize } = checkIdempotencyOptions(rawOptions)
  refuseTakenDecorators(fastify, 'erp-idempotency', ['idempotency'])
  const claims = new WeakMap<FastifyRequest, HeldClaim>()
  // From preClose on, a retry waiting for another request's answer stops (409 IN_PROGRESS):
  // over HTTP it would otherwise hold the drain until drainTimeoutMs cut its connection.
  let closing = false
  fastify.addHook('preClose', async () => { closing = true })
  const NOW = Prisma.sql`(now() AT TIME ZONE 'UTC')`
  const lease = Prisma.sql`make_interval(secs => ${recoverAfterMs / 1000})`
  const lockedUntil = recoverAfterMs > 0 ? Prisma.sql`${NOW} + ${lease}` : Prisma.sql`NULL`
  const thisKey = (c: Claim) => Prisma.sql`"companyId" = ${c.companyId} AND "userId" = ${c.userId} AND key = ${c.key}`

  const claim = async (c: HeldClaim, hash: string): Promise<boolean> => {
    const rows = await prisma.$queryRaw<Array<{ key: string }>>`
      INSERT INTO idempotency_records ("companyId", "userId", key, "requestHash", "statusCode", body, "createdAt", "expiresAt", token, "lockedUntil")
      VALUES (${c.companyId}, ${c.userId}, ${c.key}, ${hash}, ${IN_PROGRESS}, 'null'::jsonb,
              ${NOW}, ${NOW} + make_interval(secs => ${ttlSeconds}), ${c.token}, ${lockedUntil})
      ON CONFLICT DO NOTHING
      RETURNING key`
    return rows.length === 1
  }

  const find = async (c: Claim): Promise<RecordRow | undefined> => {
    const rows = await prisma.$queryRaw<RecordRow[]>`
      SELECT "requestHash", "statusCode", body, "expiresAt" <= ${NOW} AS expired, token,
             "lockedUntil" <= ${NOW} AS stale, "committedAt" IS NOT NULL AS committed,
             "committedAt" <= ${NOW} - ${lease} AS "committedLongAgo"
      FROM idempotency_records WHERE ${thisKey(c)}`
    return rows[0]
  }

  /** A stale claim whose change did not commit becomes `c`'s (false: someone else changed it first). */
  const takeOver = async (c: HeldClaim, from: string): Promise<boolean> => {
    const rows = await prisma.$queryRaw<Array<{ key: string }>>`
      UPDATE idempotency_records SET token = ${c.token}, "lockedUntil" = ${lockedUntil}
      WHERE ${thisKey(c)} AND token = ${from} AND "statusCode" = ${IN_PROGRESS}
        AND "committedAt" IS NULL AND "lockedUntil" <= ${NOW}
      RETURNING key`
    return rows.length === 1
  }

  // Only while the claim is still this request's: one taken over belongs to the later request.
  const store = (c: HeldClaim, statusCode: number, body: StoredBody) => prisma.$executeRaw`
    UPDATE idempotency_records SET "statusCode" = ${statusCode}, body = ${JSON.stringify(body)}::jsonb
    WHERE ${thisKey(c)} AND token = ${c.token} AND "statusCode" = ${IN_PROGRESS}`

  /**
   * For an answer that is not stored (a 5xx, a stream): the key is released so a retry runs
   * again, unless the request's eventLog write committed (the fence marked the claim). Then
   * running it again would apply the change twice: retries get RESPONSE_LOST instead.
   */
  const release = async (c: HeldClaim): Promise<void> => {
    const released = await prisma.$executeRaw`
      DELETE FROM idempotency_records
      WHERE ${thisKey(c)} AND token = ${c.token} AND "statusCode" = ${IN_PROGRESS} AND "committedAt" IS NULL`
    if (released === 1) return
    const lost = new Errors.IDEMPOTENCY_KEY_RESPONSE_LOST()
    await store(c, lost.statusCode, {
      contentType: 'application/json; charset=utf-8',
      payload: JSON.stringify({ error: { code: lost.code, message: lost.message } })
    })
  }

  const replay = (reply: FastifyReply, statusCode: number, body: StoredBody) => {
    reply.code(statusCode).header('idempotent-replayed', 'true')
    if (body.contentType) reply.header('content-type', body.contentType)
    if (body.payload === '') return reply.send()
    return reply.send(body.encoding === 'base64' ? Buffer.from(body.payload, 'base64') : body.payload)
  }

  const preHandler: preHandlerHookHandler = async function (request, reply) {
    const header = request.headers['idempotency-key']
    if (header === undefined || !request.user) return
    if (typeof header !== 'string' || !KEY.test(header)) {
      throw new Errors.IDEMPOTENCY_KEY_INVALID()
    }
    // A route that checks membership in its write ('in-write') may answer from a stored response
    // without writing: the check runs here instead, before anything is claimed or replayed.
    await fastify.erpAuth.checkMembership(request)
    const c: HeldClaim = { companyId: request.user.companyId, userId: request.user.userId, key: header, token: randomUUID() }
    const described = `${request.method}\n${request.url}\n${canonical(request.body ?? null)}`
    const bodyHash = createHash('sha256').update(described).digest('hex')
    // If-Match is part of the request (a version, like the body's baseVersion), as the version it
    // names ("2", W/"2" and 2 alike). Added only when sent, so a request without it hashes as
    // earlier versions stored it; a record stored by those for a request with If-Match (body
    // only) still answers its retry.
    const ifMatch = request.headers['if-match']
    const version = ifMatch === undefined ? undefined : ifMatchVersion(String(ifMatch)) ?? String(ifMatch).trim()
    const hash = version === undefined ? bodyHash : createHash('sha256').update(`${described}\nif-match: ${version}`).digest('hex')
    const sameRequest = (stored: string) => stored === hash || (version !== undefined && stored === bodyHash)
    const deadline = Date.now() + waitMs
    let reclaims = 0
    for (;;) {
      if (await claim(c, hash)) {
        claims.set(request, c)
        return
      }
      const row = await find(c)
      if (!row || row.expired) {
        // Released (the first attempt failed with a 5xx), pruned, or expired: claim it again.
        if (++reclaims > 5) throw new Errors.IDEMPOTENCY_KEY_IN_PROGRESS()
        if (!row) continue
        await prisma.$executeRaw`DELETE FROM idempotency_records WHERE ${thisKey(c)} AND "expiresAt" <= ${NOW}`
        continue
      }
      if (!sameRequest(row.requestHash)) throw new Errors.IDEMPOTENCY_KEY_REUSED()
      if (row.statusCode !== IN_PROGRESS) return replay(reply, row.statusCode, row.body!)
      if (row.stale && !row.committed && await takeOver(c, row.token!)) {
        claims.set(request, c)
        return
      }
      // Committed long ago and still unanswered: its process died after the commit.
      if (recoverAfterMs > 0 && row.committedLongAgo) throw new Errors.IDEMPOTENCY_KEY_RESPONSE_LOST()
      if (Date.now() >= deadline) throw new Errors.IDEMPOTENCY_KEY_IN_PROGRESS()
      await sleep(Math.min(pollIntervalMs, Math.max(1, deadline - Date.now())))
      if (closing) throw new Errors.IDEMPOTENCY_KEY_IN_PROGRESS()
    }
  }

  const onSend: onSendHookHandler = async function (request, reply, payload) {
    const c = claims.get(request)
    if (!c) return payload
    claims.delete(request)
    try {
      if (reply.statusCode >= 500) {
        await release(c)
        return payload
      }
      if (payload !== undefined && payload !== null && typeof payload !== 'string' && !Buffer.isBuffer(payload)) {
        // A stream cannot be stored without buffering it: release the key instead.
        request.log.warn('erp-idempotency: streamed response not stored; the Idempotency-Key was released (or, if its change committed, answers RESPONSE_LOST)')
        await release(c)
        return payload
      }
      const contentType = reply.getHeader('content-type')
      await store(c, reply.statusCode, { contentType: typeof contentType === 'string' ? contentType : null, ...storedPayload(payload) })
    } catch (err) {
      // The change may have committed: keep the claim (retries answer IN_PROGRESS until it expires).
      request.log.error({ err }, 'erp-idempotency: could not store the response')
    }
    return payload
  }

  fastify.addHook('onRoute', (route) => {
    const methods = Array.isArray(route.method) ? route.method : [route.method]
    if (!methods.some(m => METHODS.has(m as HTTPMethods)) || route.config?.idempotency === false) return
    route.preHandler = [...hookList(route.preHandler), preHandler]
    route.onSend = [...hookList(route.onSend), onSend]
    // The handler runs inside its claim, so eventLog writes fence it (../claim-fence.ts).
    const handler = route.handler
    route.handler = function (request, reply) {
      const held = claims.get(request)
      return held ? heldClaims.run(held, () => handler.call(this, request, reply)) : handler.call(this, request, reply)
    }
  })

  const prune = () => deleteInBatches(pruneBatchSize, () => prisma.$executeRaw`
    DELETE FROM idempotency_records WHERE ctid IN (
      SELECT ctid FROM idempotency_records WHERE "expiresAt" <= (now() AT TIME ZONE 'UTC') LIMIT ${pruneBatchSize})`)
  every(fastify, pruneIntervalMs, 'erp-idempotency: pruning', prune)

  fastify.decorate('idempotency', { prune } satisfies Idempotency)
}

export default fp(erpIdempotency, { fastify: '5.x', name: 'erp-idempotency', dependencies: ['erp-auth'] })
