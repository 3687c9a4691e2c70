import type { FastifyInstance } from 'fastify'
import { z } from 'zod'
import { Errors, validationFailed } from '../../plugins/errors.ts'
import { companyStream } from '../../plugins/events.ts'
import type { Publish, Tx } from '../../plugins/offline-queue/index.ts'
import { sqlErrorOf } from '../../plugins/support.ts'
import type { StockItem } from '../generated/prisma/client.ts'
import { baseVersionOf, idParams, listQuery, parse, text } from './common.ts'

/**
 * A stock quantity always lies within ±QUANTITY_LIMIT: what create and count accept, and what an
 * adjustment may leave. Well inside PostgreSQL's int4 (±2147483647), so that the difference of
 * two quantities (a count's movement delta) fits the int4 `stock_movements.delta` too.
 */
const QUANTITY_LIMIT = 1_000_000_000
const NEGATIVE_REFUSED = 'must not be negative: the item does not allow negative stock (allowNegative: false)'

const quantity = z.number().int().min(-QUANTITY_LIMIT).max(QUANTITY_LIMIT)
const createBody = z.object({
  sku: z.string().trim().min(1).max(64).regex(/^[\w.\-/]+$/, 'may contain letters, digits, _ . - /'),
  name: text(200),
  quantity: quantity.default(0),
  reorderLevel: z.number().int().min(0).max(1_000_000_000).default(0),
  allowNegative: z.boolean().default(false)
}).strict().superRefine((body, ctx) => {
  if (body.quantity < 0 && !body.allowNegative) ctx.addIssue({ code: 'custom', path: ['quantity'], message: NEGATIVE_REFUSED })
})
const adjustmentBody = z.object({
  delta: z.number().int().min(-QUANTITY_LIMIT).max(QUANTITY_LIMIT).refine(d => d !== 0, 'must not be 0'),
  reason: text(500)
}).strict()
const countBody = z.object({
  quantity,
  baseVersion: z.number().int().min(1).optional(),
  reason: text(500).optional()
}).strict()

/** Publishes stock:updated, and stock:low when the quantity fell to or below the reorder level. */
async function announce (publish: Publish, item: StockItem, before: number, actorId: string, extra: { delta: number, reason: string, movementId: string }) {
  const companyId = item.companyId
  await publish({ stream: companyStream(companyId), type: 'stock:updated', companyId, actorId, data: { item, ...extra } })
  if (before > item.reorderLevel && item.quantity <= item.reorderLevel) {
    await publish({ stream: companyStream(companyId), type: 'stock:low', companyId, actorId, data: { item, reorderLevel: item.reorderLevel } })
  }
}

async function recordMovement (tx: Tx, item: StockItem, delta: number, reason: string, actorId: string) {
  return await tx.stockMovement.create({
    data: { companyId: item.companyId, itemId: item.id, delta, reason, actorId, resultingQuantity: item.quantity }
  })
}

export async function stockRoutes (fastify: FastifyInstance) {
  fastify.addHook('preHandler', fastify.authenticate)

  fastify.get('/stock/items', async (request) => {
    const { limit, offset } = parse(listQuery, request.query)
    return { items: await fastify.prisma.stockItem.findMany({ where: { companyId: request.user.companyId }, orderBy: { sku: 'asc' }, take: limit, skip: offset }) }
  })

  fastify.post('/stock/items', async (request, reply) => {
    const body = parse(createBody, request.body)
    const { companyId, userId } = request.user
    const item = await fastify.eventLog.transaction(async (tx, publish) => {
      if (await tx.stockItem.findUnique({ where: { companyId_sku: { companyId, sku: body.sku } }, select: { id: true } })) {
        throw new Errors.ALREADY_EXISTS(`SKU ${body.sku}`)
      }
      // A concurrent create of the same SKU can pass the check above: the unique index
      // (companyId, sku) refuses all but one, and the others get the same 409. The id is a new
      // uuid, so a unique violation of this insert is that index.
      const item = await tx.stockItem.create({ data: { ...body, companyId } }).catch((err: unknown) => {
        throw sqlErrorOf(err)?.code === '23505' ? new Errors.ALREADY_EXISTS(`SKU ${body.sku}`) : err
      })
      await fastify.conflicts.snapshot(tx, 'stockItem', item)
      await publish({ stream: companyStream(companyId), type: 'stock:updated', companyId, actorId: userId, data: { item } })
      return item
    }, { guard: fastify.erpAuth.writeGuard(request) })
    reply.code(201)
    return { item }
  })

  fastify.get('/stock/items/:id', async (request) => {
    const { id } = parse(idParams, request.params)
    const item = await fastify.prisma.stockItem.findFirst({ where: { id, companyId: request.user.companyId } })
    if (!item) throw new Errors.NOT_FOUND('Stock item')
    return { item }
  })

  // Commutative: the quantity changes by delta in one SQL statement, so concurrent adjustments
  // all apply and sum exactly; the guard refuses a negative result unless the item allows it
  // (409 INSUFFICIENT_STOCK), and a result beyond ±QUANTITY_LIMIT (400 VALIDATION_FAILED on
  // delta; computed in bigint, so it never overflows int4 on the way).
  fastify.post('/stock/items/:id/adjustments', async (request, reply) => {
    const { id } = parse(idParams, request.params)
    const { delta, reason } = parse(adjustmentBody, request.body)
    const { companyId, userId } = request.user
    const result = await fastify.eventLog.transaction(async (tx, publish) => {
      const apply = () => tx.$queryRaw<Array<{ id: string }>>`
        UPDATE stock_items SET quantity = quantity + ${delta}, version = version + 1, "updatedAt" = (now() AT TIME ZONE 'UTC')
        WHERE id = ${id} AND "companyId" = ${companyId}
          AND quantity::bigint + ${delta}::bigint BETWEEN ${-QUANTITY_LIMIT}::bigint AND ${QUANTITY_LIMIT}::bigint
          AND ("allowNegative" OR quantity::bigint + ${delta}::bigint >= 0)
        RETURNING id`
      if ((await apply()).length === 0) {
        // Refused, or not there. Another adjustment may commit between the refusal and a read of
        // the row (an answer built from that newer row named the wrong reason and quantity), so the
        // row is locked and decided on as it is now: refused with its exact reason, or, if it now
        // allows the change, applied.
        const [locked] = await tx.$queryRaw<Array<{ quantity: number, allowNegative: boolean }>>`
          SELECT quantity, "allowNegative" FROM stock_items WHERE id = ${id} AND "companyId" = ${companyId} FOR UPDATE`
        if (!locked) throw new Errors.NOT_FOUND('Stock item')
        const total = locked.quantity + delta
        if (Math.abs(total) > QUANTITY_LIMIT) {
          throw validationFailed([{ path: 'delta', message: `the quantity would become ${total} (quantity ${locked.quantity}, delta ${delta}), outside -${QUANTITY_LIMIT}..${QUANTITY_LIMIT}` }])
        }
        if (total < 0 && !locked.allowNegative) throw new Errors.INSUFFICIENT_STOCK(`quantity ${locked.quantity}, delta ${delta}`)
        await apply()
      }
      const item = (await tx.stockItem.findFirst({ where: { id, companyId } }))!
      await fastify.conflicts.snapshot(tx, 'stockItem', item)
      const movement = await recordMovement(tx, item, delta, reason, userId)
      await announce(publish, item, item.quantity - delta, userId, { delta, reason, movementId: movement.id })
      return { item, movement }
    }, { guard: fastify.erpAuth.writeGuard(request) })
    reply.code(201)
    return result
  })

  // An absolute count is versioned like any other update: a stale baseVersion conflicts. A
  // negative count of an item that does not allow negative stock is refused (400
  // VALIDATION_FAILED on quantity) where the item is read, before any version check.
  fastify.put('/stock/items/:id/count', async (request) => {
    const { id } = parse(idParams, request.params)
    const body = parse(countBody, request.body)
    const baseVersion = baseVersionOf(request, body.baseVersion)
    const { companyId, userId } = request.user
    return await fastify.conflicts.update({
      entity: 'stockItem',
      id,
      companyId,
      userId,
      baseVersion,
      changes: { quantity: body.quantity },
      // A count is an observation, not an edit of the base value: it conflicts with any change since.
      assertAll: true,
      guard: fastify.erpAuth.writeGuard(request),
      read: async (tx) => {
        const item = await tx.stockItem.findFirst({ where: { id, companyId } })
        // allowNegative is fixed at create; nothing changes it afterwards.
        if (item && body.quantity < 0 && !item.allowNegative) throw validationFailed([{ path: 'quantity', message: NEGATIVE_REFUSED }])
        return item
      },
      // A custom resolver may write the quantity only, under the count's own rules.
      accept: (fields, item) => {
        const resolved = z.object({ quantity: quantity.optional() }).strict().parse(fields)
        if (resolved.quantity !== undefined && resolved.quantity < 0 && !item.allowNegative) throw new Error(`quantity ${NEGATIVE_REFUSED}`)
        return resolved
      },
      write: (tx, data, version) => tx.stockItem.updateMany({ where: { id, companyId, version }, data: { ...data, version: { increment: 1 } } }),
      applied: async (tx, publish, item, { before }) => {
        const delta = item.quantity - before.quantity
        const reason = body.reason ?? 'count'
        const movement = await recordMovement(tx, item, delta, reason, userId)
        await announce(publish, item, before.quantity, userId, { delta, reason, movementId: movement.id })
      },
      respond: (item, merged) => ({ item, merged })
    })
  })
}
