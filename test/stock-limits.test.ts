import t from 'tap'
import type { FastifyInstance } from 'fastify'
import { authHeader, build, createCompany, type TestUser } from './helpers.ts'

const create = (app: FastifyInstance, user: TestUser, body: Record<string, unknown>) =>
  app.inject({ method: 'POST', url: '/stock/items', headers: authHeader(user), payload: { sku: `SKU-${Math.random().toString(36).slice(2, 8)}`, name: 'Cement 25kg', ...body } })

async function createItem (app: FastifyInstance, user: TestUser, body: Record<string, unknown>) {
  const res = await create(app, user, body)
  if (res.statusCode !== 201) throw new Error(`create failed: ${res.statusCode} ${res.body}`)
  return res.json().item as { id: string, quantity: number, version: number }
}

const adjust = (app: FastifyInstance, user: TestUser, id: string, delta: number) =>
  app.inject({ method: 'POST', url: `/stock/items/${id}/adjustments`, headers: authHeader(user), payload: { delta, reason: 'test' } })

const count = (app: FastifyInstance, user: TestUser, id: string, payload: Record<string, unknown>) =>
  app.inject({ method: 'PUT', url: `/stock/items/${id}/count`, headers: authHeader(user), payload })

t.test('negative quantity on create without allowNegative: 400 VALIDATION_FAILED naming quantity, no item created', async t => {
  const { app, prisma } = await build(t)
  const company = await createCompany(app, ['manager'])
  const manager = company.as('manager')

  const refused = await create(app, manager, { sku: 'NEG-1', quantity: -50 })
  t.equal(refused.statusCode, 400)
  t.match(refused.json().error, { code: 'VALIDATION_FAILED', message: /^Invalid input: quantity: must not be negative/, issues: [{ path: 'quantity' }] })
  const explicit = await create(app, manager, { sku: 'NEG-2', quantity: -1, allowNegative: false })
  t.equal(explicit.statusCode, 400)
  t.equal(await prisma.stockItem.count({ where: { companyId: company.id } }), 0, 'nothing created')
  t.equal(await prisma.event.count({ where: { type: 'stock:updated' } }), 0, 'nothing published')

  const loose = await create(app, manager, { sku: 'NEG-3', quantity: -50, allowNegative: true })
  t.equal(loose.statusCode, 201, 'an item that allows negative stock may start below zero')
  t.equal(loose.json().item.quantity, -50)
})

t.test('negative count of an item that does not allow negative stock: 400 VALIDATION_FAILED naming quantity, nothing changes', async t => {
  const { app, prisma } = await build(t)
  const company = await createCompany(app, ['manager'])
  const manager = company.as('manager')
  const strict = await createItem(app, manager, { quantity: 10 })

  const refused = await count(app, manager, strict.id, { quantity: -7, baseVersion: 1 })
  t.equal(refused.statusCode, 400)
  t.match(refused.json().error, { code: 'VALIDATION_FAILED', message: /^Invalid input: quantity: must not be negative/, issues: [{ path: 'quantity' }] })
  const viaIfMatch = await app.inject({ method: 'PUT', url: `/stock/items/${strict.id}/count`, headers: { ...authHeader(manager), 'if-match': '"1"' }, payload: { quantity: -1 } })
  t.equal(viaIfMatch.statusCode, 400)
  t.match(await prisma.stockItem.findUniqueOrThrow({ where: { id: strict.id } }), { quantity: 10, version: 1 })
  t.equal(await prisma.stockMovement.count({ where: { itemId: strict.id } }), 0)
  t.equal(await prisma.revision.count({ where: { entityId: strict.id } }), 1, 'only the create snapshot')

  // Zero is a valid count; an unknown item is still 404.
  t.equal((await count(app, manager, strict.id, { quantity: 0, baseVersion: 1 })).statusCode, 200)
  t.equal((await count(app, manager, 'no-such-item', { quantity: -1, baseVersion: 1 })).statusCode, 404)

  const loose = await createItem(app, manager, { quantity: 10, allowNegative: true })
  const applied = await count(app, manager, loose.id, { quantity: -7, baseVersion: 1 })
  t.equal(applied.statusCode, 200)
  t.match(applied.json().item, { quantity: -7, version: 2 })
})

t.test('concurrent creates of one SKU: one 201, the rest 409 ALREADY_EXISTS (the unique violation is not a 500)', async t => {
  const { app, prisma } = await build(t)
  const company = await createCompany(app, ['manager'])
  const manager = company.as('manager')

  // Deterministic: another transaction has inserted the SKU but not committed, so the route's
  // existence check does not see it and its insert waits on the unique index until that commits.
  let release!: () => void
  const held = new Promise<void>(resolve => { release = resolve })
  let inserted!: () => void
  const insertedP = new Promise<void>(resolve => { inserted = resolve })
  const holder = prisma.$transaction(async (tx) => {
    await tx.stockItem.create({ data: { companyId: company.id, sku: 'RACE-1', name: 'other writer' } })
    inserted()
    await held
  }, { timeout: 30_000 })
  await insertedP
  const pending = create(app, manager, { sku: 'RACE-1' })
  for (let i = 0; ; i++) {
    const [{ waiting }] = await prisma.$queryRaw<Array<{ waiting: number }>>`
      SELECT count(*)::int AS waiting FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`
    if (waiting > 0) break
    if (i > 500) throw new Error('the create never waited on the unique index')
    await new Promise(resolve => setTimeout(resolve, 10))
  }
  release()
  await holder
  const loser = await pending
  t.equal(loser.statusCode, 409)
  t.match(loser.json().error, { code: 'ALREADY_EXISTS', message: 'SKU RACE-1 already exists' })

  // The same through the HTTP route only: every loser answers like a sequential duplicate.
  const responses = await Promise.all(Array.from({ length: 16 }, () => create(app, manager, { sku: 'RACE-2' })))
  t.equal(responses.filter(r => r.statusCode === 201).length, 1)
  t.ok(responses.filter(r => r.statusCode !== 201).every(r => r.statusCode === 409 && r.json().error.code === 'ALREADY_EXISTS'), 'the others are 409 ALREADY_EXISTS')
  t.equal(await prisma.stockItem.count({ where: { companyId: company.id, sku: 'RACE-2' } }), 1)
  t.equal(await prisma.event.count({ where: { type: 'stock:updated' } }), 1, 'one stock:updated, for the winner')
})

t.test('an adjustment past the quantity limit (±1,000,000,000): 400 VALIDATION_FAILED naming delta, never an int4 overflow 500', async t => {
  const { app, prisma } = await build(t)
  const company = await createCompany(app, ['manager'])
  const manager = company.as('manager')

  const big = await createItem(app, manager, { quantity: 1_000_000_000 })
  for (let i = 0; i < 3; i++) {
    const refused = await adjust(app, manager, big.id, 1_000_000_000)
    t.equal(refused.statusCode, 400, `+1e9 #${i + 1}`)
    t.match(refused.json().error, { code: 'VALIDATION_FAILED', message: /^Invalid input: delta: the quantity would become 2000000000 /, issues: [{ path: 'delta' }] })
  }
  t.match(await prisma.stockItem.findUniqueOrThrow({ where: { id: big.id } }), { quantity: 1_000_000_000, version: 1 })
  t.equal(await prisma.stockMovement.count({ where: { itemId: big.id } }), 0)
  t.equal((await adjust(app, manager, big.id, -1)).statusCode, 201, 'back inside the range applies')
  t.equal((await adjust(app, manager, big.id, 1)).statusCode, 201, 'up to the limit itself applies')
  t.equal((await adjust(app, manager, big.id, 1)).statusCode, 400)

  const low = await createItem(app, manager, { quantity: -1_000_000_000, allowNegative: true })
  const below = await adjust(app, manager, low.id, -1_000_000_000)
  t.equal(below.statusCode, 400)
  t.match(below.json().error, { code: 'VALIDATION_FAILED', message: /would become -2000000000 / })
  t.equal((await prisma.stockItem.findUniqueOrThrow({ where: { id: low.id } })).quantity, -1_000_000_000)

  // A count can swing the whole range; its movement delta (2e9) still fits int4.
  const swing = await count(app, manager, low.id, { quantity: 1_000_000_000, baseVersion: 1 })
  t.equal(swing.statusCode, 200)
  t.match(await prisma.stockMovement.findFirstOrThrow({ where: { itemId: low.id } }), { delta: 2_000_000_000, resultingQuantity: 1_000_000_000 })

  // A negative result of an item that does not allow it is still 409 INSUFFICIENT_STOCK.
  const empty = await createItem(app, manager, { quantity: 0 })
  const insufficient = await adjust(app, manager, empty.id, -1_000_000_000)
  t.equal(insufficient.statusCode, 409)
  t.equal(insufficient.json().error.code, 'INSUFFICIENT_STOCK')

  // Create and count take a quantity within the same limit only.
  t.equal((await create(app, manager, { quantity: 1_000_000_001 })).statusCode, 400)
  t.equal((await count(app, manager, empty.id, { quantity: 2_147_483_648, baseVersion: 1 })).statusCode, 400)
})
