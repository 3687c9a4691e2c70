import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { z } from 'zod'
import { deleteInBatches, every, parseOptions, refuseTakenDecorators, TEN_YEARS_S, timerMs } from '../support.ts'
import { Prisma, type PrismaClient } from '../../src/generated/prisma/client.ts'
import { Errors, type ErrorWithBody } from '../errors.ts'
import { userStream } from '../events.ts'
import type { Publish, Tx, WriteGuard } from '../offline-queue/index.ts'

type Fields = Record<string, unknown>
type Snapshotted = { id: string, companyId: string, version: number }

/** What a custom resolver sees when incoming fields overlap fields changed since the base. */
export interface ConflictContext {
  entity: string
  id: string
  /** Field names changed both by this request and (to something else) by someone else since `baseVersion`. */
  fields: string[]
  /** The row as it was at `baseVersion` (null when that revision is no longer kept). */
  base: Fields | null
  current: Fields
  /** The incoming changes, as sent. */
  yours: Fields
  /** What a field-level merge would write: the fields this request really changed (those equal to the base dropped). */
  merged: Fields
}

/** Returns the fields to write, or null to reject with 409 CONFLICT. */
export type ConflictResolver = (context: ConflictContext) => Fields | null | Promise<Fields | null>
export type ConflictStrategy = 'reject' | 'last-write-wins' | ConflictResolver

export interface ErpConflictsOptions {
  /** Prisma client holding the `revisions` table. Required. */
  prisma: PrismaClient
  /**
   * Strategy per entity name (`project`, `stockItem`...) for overlapping fields: `'reject'`
   * (409 CONFLICT), `'last-write-wins'` (the incoming values win), or a resolver function.
   * Default `'reject'` for every entity.
   */
  strategies?: Record<string, ConflictStrategy>
  /**
   * The entity names your routes pass to `update`, `snapshot` and `forget`. When given, a
   * `strategies` key that is not one of them fails the registration (a misspelled key would
   * otherwise leave its entity on `'reject'`), and so does a call naming another entity. Default:
   * not checked.
   */
  entities?: string[]
  /** Revisions older than this are pruned (the base of a very stale edit is then unknown, and every differing field conflicts). Default 30 days. */
  revisionTtlSeconds?: number
  /** How often the revision pruning job runs; 0 disables. Default 3600000. */
  pruneIntervalMs?: number
  /** Rows deleted per statement by the pruning job; at most 10 statements per run. Default 5000. */
  pruneBatchSize?: number
}

export interface VersionedUpdate<Row extends { version: number }, Result> {
  entity: string
  id: string
  companyId: string
  userId: string
  baseVersion: number
  changes: Fields
  /**
   * Treat every incoming field as changed by this request, even when it equals the base
   * (an absolute observation such as a stock count). Default false: a field sent with its
   * base value is not a change, and someone else's newer value is kept.
   */
  assertAll?: boolean
  /**
   * The caller's membership check (`fastify.erpAuth.writeGuard(request, roles?)`), evaluated
   * when the update has the row's lock (after waiting in the row's queue, before anything is
   * read) and again just before it commits: a member removed meanwhile gets 403 and no data,
   * and nothing is written.
   */
  guard?: WriteGuard
  /** Reads the row in the transaction (scoped to the company); null → 404. */
  read (tx: Tx): Promise<Row | null>
  /** Writes `data` only if the row still has `version` (and bumps it); returns the match count. */
  write (tx: Tx, data: Fields, version: number): Promise<{ count: number }>
  /**
   * Checks the fields a custom resolver returned against the rules of the fields this update may
   * change, and returns what to write; throw to refuse. A refusal writes nothing and answers 500
   * CONFLICT_RESOLVER_INVALID (a bug in the resolver, logged with its reason). Without it the
   * resolver's fields are written as returned, bookkeeping columns excepted.
   */
  accept? (fields: Fields, current: Row): Fields
  /** Runs in the same transaction once the write applied: publish its events, record side rows. */
  applied (tx: Tx, publish: Publish, row: Row, info: { before: Row, changed: string[], merged: boolean }): Promise<void>
  respond (row: Row, merged: boolean): Result
}

export interface Conflicts {
  /**
   * Applies a versioned update: as-is when `baseVersion` is current; merged field by field
   * when the fields changed since the base do not overlap the incoming ones; otherwise by the
   * entity's strategy (default: 409 CONFLICT with `current`, `yours`, `base`, `fields`).
   * Never loses an update: updates of one row are serialised (transaction-scoped advisory
   * lock) and the write is conditional on the version it read.
   */
  update<Row extends { version: number }, Result> (update: VersionedUpdate<Row, Result>): Promise<Result>
  /**
   * Keeps a row's snapshot at its version, as the base of later merges. Call it in the
   * transaction that wrote that version. Several rows go in one statement per 1,000.
   */
  snapshot (tx: Tx, entity: string, row: Snapshotted | readonly Snapshotted[]): Promise<void>
  /** The snapshot as one SQL statement, for `eventLog.commit({ writes })` (the row written by the same statement). */
  snapshotStatement (entity: string, row: Snapshotted): Prisma.Sql
  /**
   * Drops every snapshot of a row. Call it in the transaction that deletes the row: the pruning
   * job keeps each row's latest snapshot for as long as it exists, so a deleted row's would stay
   * (with its data) for good.
   */
  forget (tx: Tx, entity: string, id: string): Promise<void>
  /** Runs the revision pruning job once; returns how many revisions it deleted. */
  prune (): Promise<number>
}

declare module 'fastify' {
  interface FastifyInstance {
    conflicts: Conflicts
  }
}

const strategySchema = z.union([z.literal('reject'), z.literal('last-write-wins'), z.custom<ConflictResolver>(v => typeof v === 'function')],
  { error: "must be 'reject', 'last-write-wins' or a resolver function" })
const optionsSchema = z.object({
  prisma: z.custom<PrismaClient>(v => typeof v === 'object' && v !== null && 'revision' in v, 'must be a PrismaClient with the erp-realtime models'),
  strategies: z.record(z.string(), strategySchema).default({}),
  entities: z.array(z.string().min(1).max(100)).min(1).optional(),
  revisionTtlSeconds: z.number().int().min(60).max(TEN_YEARS_S).default(30 * 24 * 3600),
  pruneIntervalMs: timerMs(0).default(3_600_000),
  pruneBatchSize: z.number().int().min(1).max(100_000).default(5000)
}).strict().superRefine((options, ctx) => {
  if (!options.entities) return
  for (const key of Object.keys(options.strategies)) {
    if (options.entities.includes(key)) continue
    const near = options.entities.find(entity => entity.toLowerCase() === key.toLowerCase())
    ctx.addIssue({ code: 'custom', path: ['strategies', key], message: `is not one of the entities (${options.entities.join(', ')})${near ? `; did you mean ${near}?` : ''}` })
  }
})

// Bookkeeping columns never take part in a merge, and a resolver cannot write them.
const META = new Set(['id', 'companyId', 'version', 'createdAt', 'updatedAt'])

// Prisma reads a BigInt column as a bigint, which JSON.stringify refuses, and a Decimal column as
// a Decimal, which it writes as a string: both are kept as decimal strings.
const toJson = (_key: string, value: unknown) => typeof value === 'bigint' ? value.toString() : value
// A JSON number sent for a BigInt or Decimal column (a decimal string in the row) with its value:
// written the same way (as Decimal and JavaScript both write numbers), so a value a double cannot
// hold exactly, or a text column's "007", is never taken for it.
const sameNumber = (n: unknown, text: unknown) => typeof n === 'number' && typeof text === 'string' && String(n) === text

// Rows are compared as JSON (a Date and its ISO string are the same value; so are 12.5 and a
// Decimal 12.5).
const same = (a: unknown, b: unknown) => JSON.stringify(a, toJson) === JSON.stringify(b, toJson) || sameNumber(a, b) || sameNumber(b, a)

function plain (row: object): Fields {
  return JSON.parse(JSON.stringify(row, toJson)) as Fields
}

const withoutMeta = (fields: Fields): Fields => Object.fromEntries(Object.entries(fields).filter(([field]) => !META.has(field)))

function accepted<Row extends { version: number }> (u: VersionedUpdate<Row, unknown>, fields: Fields, current: Row): Fields {
  if (!u.accept) return fields
  // A resolver may return a whole row (`{ ...current, quantity }`): fields it leaves as they are
  // change nothing, and are not held to the rules of what an update may change.
  const row = plain(current)
  const changes = Object.fromEntries(Object.entries(fields).filter(([field, value]) => !same(value, row[field])))
  try {
    return u.accept(changes, current)
  } catch (err) {
    const reason = err instanceof z.ZodError
      ? err.issues.map(issue => `${issue.path.join('.') || '(fields)'}: ${issue.message}`).join('; ')
      : err instanceof Error ? err.message : String(err)
    throw new Errors.CONFLICT_RESOLVER_INVALID(u.entity, reason, { cause: err })
  }
}

class ConflictRejected extends Error {
  constructor (public readonly context: ConflictContext) {
    super('conflict')
  }
}

/** How many times a write that lost to a writer outside `update()` (a stock adjustment) is re-read and retried. */
const MAX_ATTEMPTS = 10

/** Validates erp-conflicts's options as registering it does, without registering it; throws naming the option. */
export const checkConflictsOptions = (raw: unknown) => parseOptions('erp-conflicts', optionsSchema, raw)

async function erpConflicts (fastify: FastifyInstance, rawOptions: ErpConflictsOptions) {
  const { prisma, strategies, entities, revisionTtlSeconds, pruneIntervalMs, pruneBatchSize } = checkConflictsOptions(rawOptions)
  const known = entities && new Set(entities)
  const checkEntity = (entity: string) => {
    if (known && !known.has(entity)) throw new TypeError(`erp-conflicts: ${JSON.stringify(entity)} is not one of the entities (${entities!.join(', ')})`)
  }
  refuseTakenDecorators(fastify, 'erp-conflicts', ['conflicts'])

  const snapshotStatement = (entity: string, row: Snapshotted | readonly Snapshotted[]) => {
    checkEntity(entity)
    return Prisma.sql`
    INSERT INTO revisions (entity, "entityId", version, "companyId", data, "createdAt")
    VALUES ${Prisma.join((Array.isArray(row) ? row : [row] as const).map(r =>
      Prisma.sql`(${entity}, ${r.id}, ${r.version}, ${r.companyId}, ${JSON.stringify(plain(r))}::jsonb, (now() AT TIME ZONE 'UTC'))`))}
    ON CONFLICT DO NOTHING`
  }
  // One round trip on the hot path of every create and update; 5 parameters a row, so a batch
  // stays far below PostgreSQL's 65,535.
  const snapshot = async (tx: Tx, entity: string, row: Snapshotted | readonly Snapshotted[]) => {
    const rows: readonly Snapshotted[] = Array.isArray(row) ? row : [row as Snapshotted]
    for (let i = 0; i < rows.length; i += 1000) await tx.$executeRaw(snapshotStatement(entity, rows.slice(i, i + 1000)))
  }

  // Updates of one row queue in memory on this node before they take a pooled connection, so
  // a burst on one row waits here instead of filling the pool with transactions blocked on its
  // lock. The advisory lock below still serialises them across nodes.
  const queues = new Map<string, Promise<unknown>>()
  function serialised<T> (key: string, fn: () => Promise<T>): Promise<T> {
    const run = (queues.get(key) ?? Promise.resolve()).then(fn)
    const tail = run.then(() => {}, () => {})
    queues.set(key, tail)
    void tail.then(() => { if (queues.get(key) === tail) queues.delete(key) })
    return run
  }

  /** `conflict:detected` on the editor's stream: how their overlapping edit was resolved. */
  const publishDetected = (publish: Publish, u: VersionedUpdate<{ version: number }, unknown>, fields: string[], resolution: string) => publish({
    stream: userStream(u.userId),
    type: 'conflict:detected',
    companyId: u.companyId,
    actorId: u.userId,
    data: { entity: u.entity, entityId: u.id, fields, resolution }
  })

  function update<Row extends { version: number }, Result> (u: VersionedUpdate<Row, Result>): Promise<Result> {
    // Keyed by company too: a caller of another company who knows the id gets its 404 without
    // queueing behind (or holding up) the row's own company's updates.
    return serialised(`${u.companyId}:${u.entity}:${u.id}`, () => apply(u))
  }

  async function apply<Row extends { version: number }, Result> (u: VersionedUpdate<Row, Result>): Promise<Result> {
    checkEntity(u.entity)
    const strategy = strategies[u.entity] ?? 'reject'
    const changes = withoutMeta(u.changes)
    try {
      return await fastify.eventLog.transaction(async (tx, publish) => {
        // Updates of one row through update() queue here until the previous one commits, so each
        // reads the version its predecessor wrote (READ COMMITTED: every statement sees the latest
        // commit). The conditional write still guards against writers that bypass the lock.
        const lock = Prisma.sql`SELECT pg_advisory_xact_lock(hashtextextended(${`erp-conflicts:${u.companyId}:${u.entity}:${u.id}`}, 0))`
        if (u.guard) {
          // The guard in the lock's statement (no round trip more), evaluated once the lock is
          // held: a subquery with a volatile function is not flattened into the outer one.
          await tx.$queryRaw`SELECT ${u.guard.sql} AS value FROM (${lock}) AS locked`
        } else {
          await tx.$executeRaw(lock)
        }
        for (let attempt = 0; attempt < MAX_ATTEMPTS; attempt++) {
          const current = await u.read(tx)
          if (!current) throw new Errors.NOT_FOUND(u.entity)
          if (u.baseVersion > current.version) {
            throw new Errors.VALIDATION_FAILED(`baseVersion ${u.baseVersion} is newer than the ${u.entity}'s version ${current.version}`)
          }
          const now = plain(current)
          let data: Fields = changes
          let merged = false
          let resolution: string | undefined
          let fields: string[] = []
          if (current.version !== u.baseVersion) {
            merged = true
            const baseRow = await tx.revision.findUnique({
              where: { entity_entityId_version: { entity: u.entity, entityId: u.id, version: u.baseVersion } }
            })
            // Ids are per entity, not per company: a revision of another company's row is no base.
            const base = baseRow && baseRow.companyId === u.companyId ? (baseRow.data as Fields) : null
            // Three-way: a field sent with its base value is not a change of this request; a field
            // conflicts when this request and someone else since the base both changed it, differently.
            const mine = Object.keys(changes).filter(field => u.assertAll || base === null || !same(changes[field], base[field]))
            const theirs = (field: string) => base === null || !same(now[field], base[field])
            fields = mine.filter(field => theirs(field) && !same(changes[field], now[field]))
            const mergedData = Object.fromEntries(mine.map(field => [field, changes[field]]))
            data = mergedData
            if (fields.length > 0) {
              const context: ConflictContext = { entity: u.entity, id: u.id, fields, base, current: now, yours: u.changes, merged: mergedData }
              if (strategy === 'reject') throw new ConflictRejected(context)
              if (strategy !== 'last-write-wins') {
                const resolved = await strategy(context)
                if (!resolved) throw new ConflictRejected(context)
                data = accepted(u, withoutMeta(resolved), current)
              }
              resolution = typeof strategy === 'string' ? strategy : 'custom'
            }
            // Nothing left that differs from the row (both sides made the same change, only base
            // values were sent, or a resolver kept the current row): answer the current row
            // instead of bumping its version, which would make every other client's base stale.
            if (Object.keys(data).every(field => same(data[field], now[field]))) {
              // A resolver that kept the row dropped the edit: the editor's devices are told.
              if (resolution !== undefined) await publishDetected(publish, u, fields, resolution)
              return u.respond(current, true)
            }
          }
          const { count } = await u.write(tx, data, current.version)
          if (count === 0) continue
          // Our conditional write holds the row lock until commit: it is still there.
          const row = (await u.read(tx))!
          await snapshot(tx, u.entity, row as unknown as { id: string, companyId: string, version: number })
          const changed = Object.keys(data).filter(field => !same((now)[field], (row as Fields)[field]))
          await u.applied(tx, publish, row, { before: current, changed, merged })
          // Published after the domain events (company stream first, then the user's stream:
          // the same lock order as every other writer of both streams).
          if (resolution !== undefined) await publishDetected(publish, u, fields, resolution)
          return u.respond(row, merged)
        }
        throw new Errors.SERVICE_UNAVAILABLE(`${u.entity} is being changed too often; retry`)
      }, { guard: u.guard })
    } catch (err) {
      if (!(err instanceof ConflictRejected)) throw err
      const { context } = err
      // The rejected transaction recorded nothing; tell the editor's other devices in one of its own.
      await fastify.eventLog.publish({
        stream: userStream(u.userId),
        type: 'conflict:detected',
        companyId: u.companyId,
        actorId: u.userId,
        data: { entity: u.entity, entityId: u.id, fields: context.fields, resolution: 'rejected' }
      })
      const conflict: ErrorWithBody = new Errors.CONFLICT(u.entity)
      conflict.body = { current: context.current, yours: context.yours, base: context.base, fields: context.fields }
      throw conflict
    }
  }

  // A revision goes once a newer version of its row has existed for revisionTtlSeconds: the
  // latest one of each row is the base of its next stale edit, however long it stays unchanged.
  const prune = () => {
    // The database's clock, which stamped `createdAt`, not this node's.
    const cutoff = Prisma.sql`((now() AT TIME ZONE 'UTC') - make_interval(secs => ${revisionTtlSeconds}))`
    return deleteInBatches(pruneBatchSize, () => prisma.$executeRaw`
      DELETE FROM revisions WHERE ctid IN (
        SELECT r.ctid FROM revisions r
        WHERE r."createdAt" < ${cutoff} AND EXISTS (
          SELECT 1 FROM revisions n
          WHERE n.entity = r.entity AND n."entityId" = r."entityId" AND n.version > r.version AND n."createdAt" < ${cutoff})
        LIMIT ${pruneBatchSize})`)
  }
  every(fastify, pruneIntervalMs, 'erp-conflicts: revision pruning', prune)

  const forget = async (tx: Tx, entity: string, id: string) => {
    checkEntity(entity)
    await tx.$executeRaw`DELETE FROM revisions WHERE entity = ${entity} AND "entityId" = ${id}`
  }

  fastify.decorate('conflicts', { update, snapshot, snapshotStatement, forget, prune } satisfies Conflicts)
}

export default fp(erpConflicts, { fastify: '5.x', name: 'erp-conflicts', dependencies: ['erp-offline-queue'] })
