import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { z } from 'zod'
import type { PrismaClient } from '../../src/generated/prisma/client.ts'
import { Errors, type ErrorWithBody } from '../errors.ts'
import { userStream } from '../events.ts'
import type { Publish, Tx } from '../offline-queue/index.ts'

type Fields = Record<string, unknown>

/** What a custom resolver sees when incoming fields overlap fields changed since the base. */
export interface ConflictContext {
  entity: string
  id: string
  /** Field names changed both by this request and by someone else since `baseVersion`. */
  fields: string[]
  /** The row as it was at `baseVersion` (null when that revision is no longer kept). */
  base: Fields | null
  current: Fields
  yours: Fields
}

/** Returns the fields to write, or null to reject with 409 CONFLICT. */
export type ConflictResolver = (context: ConflictContext) => Fields | null | Promise<Fields | null>
export type ConflictStrategy = 'reject' | 'last-write-wins' | ConflictResolver

export interface ErpConflictsOptions {
  /** Prisma client holding the `revisions` table. Required. */
  prisma: PrismaClient
  /** Strategy per entity name (`project`, `stockItem`...). Default `'reject'` for every entity. */
  strategies?: Record<string, ConflictStrategy>
  /** Revisions older than this are pruned (the base of a very stale edit is then unknown, and it conflicts). Default 30 days. */
  revisionTtlSeconds?: number
  /** How often the revision pruning job runs; 0 disables. Default 3600000. */
  pruneIntervalMs?: number
}

export interface VersionedUpdate<Row extends { version: number }, Result> {
  entity: string
  id: string
  companyId: string
  userId: string
  baseVersion: number
  changes: Fields
  /** Reads the row in the transaction (scoped to the company); null → 404. */
  read (tx: Tx): Promise<Row | null>
  /** Writes `data` only if the row still has `version` (and bumps it); returns the match count. */
  write (tx: Tx, data: Fields, version: number): Promise<{ count: number }>
  /** Runs in the same transaction once the write applied: publish its events, record side rows. */
  applied (tx: Tx, publish: Publish, row: Row, info: { before: Row, changed: string[], merged: boolean }): Promise<void>
  respond (row: Row, merged: boolean): Result
}

export interface Conflicts {
  /**
   * Applies a versioned update: as-is when `baseVersion` is current; merged field by field
   * when the fields changed since the base do not overlap the incoming ones; otherwise by the
   * entity's strategy (default: 409 CONFLICT with `current`, `yours`, `base`, `fields`).
   * Never loses an update: the write is conditional on the version it read.
   */
  update<Row extends { version: number }, Result> (update: VersionedUpdate<Row, Result>): Promise<Result>
  /** Keeps a row's snapshot at its version, as the base of later merges. Call it in the creating transaction. */
  snapshot (tx: Tx, entity: string, row: { id: string, companyId: string, version: number }): Promise<void>
}

declare module 'fastify' {
  interface FastifyInstance {
    conflicts: Conflicts
  }
}

const strategySchema = z.union([z.literal('reject'), z.literal('last-write-wins'), z.custom<ConflictResolver>(v => typeof v === 'function', 'must be reject, last-write-wins or a function')])
const optionsSchema = z.object({
  prisma: z.custom<PrismaClient>(v => typeof v === 'object' && v !== null && 'revision' in v, 'must be a PrismaClient with the erp-realtime models'),
  strategies: z.record(z.string(), strategySchema).default({}),
  revisionTtlSeconds: z.number().int().min(60).default(30 * 24 * 3600),
  pruneIntervalMs: z.number().int().min(0).default(3_600_000)
})

// Bookkeeping columns never take part in a merge.
const META = new Set(['id', 'companyId', 'version', 'createdAt', 'updatedAt'])

const normalize = (value: unknown): unknown => (value instanceof Date ? value.toISOString() : value)
const same = (a: unknown, b: unknown) => JSON.stringify(normalize(a)) === JSON.stringify(normalize(b))

function plain (row: object): Fields {
  return JSON.parse(JSON.stringify(row)) as Fields
}

class ConflictRejected extends Error {
  constructor (public readonly context: ConflictContext) {
    super('conflict')
  }
}

async function erpConflicts (fastify: FastifyInstance, rawOptions: ErpConflictsOptions) {
  const parsed = optionsSchema.safeParse(rawOptions)
  if (!parsed.success) {
    const issue = parsed.error.issues[0]
    throw new Error(`erp-conflicts: invalid option ${issue?.path.join('.')}: ${issue?.message}`)
  }
  const { prisma, strategies, revisionTtlSeconds, pruneIntervalMs } = parsed.data

  const snapshot = async (tx: Tx, entity: string, row: { id: string, companyId: string, version: number }) => {
    const data = plain(row) as never
    await tx.revision.upsert({
      where: { entity_entityId_version: { entity, entityId: row.id, version: row.version } },
      create: { entity, entityId: row.id, version: row.version, companyId: row.companyId, data },
      update: {}
    })
  }

  async function update<Row extends { version: number }, Result> (u: VersionedUpdate<Row, Result>): Promise<Result> {
    const strategy = strategies[u.entity] ?? 'reject'
    try {
      return await fastify.eventLog.transaction(async (tx, publish) => {
        // Each pass reads the row and writes conditionally on the version it read; a concurrent
        // writer makes the write match nothing, and the next pass sees that writer's version.
        for (let attempt = 0; attempt < 20; attempt++) {
          const current = await u.read(tx)
          if (!current) throw new Errors.NOT_FOUND(u.entity)
          if (u.baseVersion > current.version) {
            throw Object.assign(new Errors.VALIDATION_FAILED(`baseVersion ${u.baseVersion} is newer than the ${u.entity}'s version ${current.version}`))
          }
          let data: Fields = u.changes
          let merged = false
          if (current.version !== u.baseVersion) {
            const baseRow = await tx.revision.findUnique({
              where: { entity_entityId_version: { entity: u.entity, entityId: u.id, version: u.baseVersion } }
            })
            const base = baseRow ? (baseRow.data as Fields) : null
            const now = plain(current)
            // Fields this request changes that someone else also changed (to something else) since base.
            const fields = Object.keys(u.changes).filter(field => !META.has(field) &&
              !same(u.changes[field], now[field]) &&
              (base === null || !same(now[field], base[field])))
            merged = true
            if (fields.length > 0) {
              const context: ConflictContext = { entity: u.entity, id: u.id, fields, base, current: now, yours: u.changes }
              const resolved = strategy === 'reject' ? null : strategy === 'last-write-wins' ? u.changes : await strategy(context)
              if (!resolved) throw new ConflictRejected(context)
              data = resolved
              await publish({
                stream: userStream(u.userId),
                type: 'conflict:detected',
                companyId: u.companyId,
                actorId: u.userId,
                data: { entity: u.entity, entityId: u.id, fields, resolution: typeof strategy === 'string' ? strategy : 'custom' }
              })
            }
          }
          const { count } = await u.write(tx, data, current.version)
          if (count === 0) continue
          const row = await u.read(tx)
          if (!row) throw new Errors.NOT_FOUND(u.entity)
          await snapshot(tx, u.entity, row as unknown as { id: string, companyId: string, version: number })
          const changed = Object.keys(data).filter(field => !same((current as Fields)[field], (row as Fields)[field]))
          await u.applied(tx, publish, row, { before: current, changed, merged })
          return u.respond(row, merged)
        }
        throw new Errors.SERVICE_UNAVAILABLE(`${u.entity} is being changed too often; retry`)
      })
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

  let timer: NodeJS.Timeout | undefined
  if (pruneIntervalMs > 0) {
    timer = setInterval(() => {
      prisma.revision.deleteMany({ where: { createdAt: { lt: new Date(Date.now() - revisionTtlSeconds * 1000) } } })
        .catch(err => fastify.log.warn({ err }, 'erp-conflicts: revision pruning failed'))
    }, pruneIntervalMs)
    timer.unref()
  }
  fastify.addHook('onClose', async () => clearInterval(timer))

  fastify.decorate('conflicts', { update, snapshot } satisfies Conflicts)
}

export default fp(erpConflicts, { fastify: '5.x', name: 'erp-conflicts', dependencies: ['erp-offline-queue'] })
