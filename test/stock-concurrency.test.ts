import t from 'tap'
import type { FastifyInstance } from 'fastify'
import { authHeader, build, createCompany, testDatabase, type TestUser } from './helpers.ts'

async function createItem (app: FastifyInstance, user: TestUser, body: Record<string, unknown>) {
  const res = await app.inject({ method: 'POST', url: '/stock/items', headers: authHeader(user), payload: { sku: `SKU-${Math.random().toString(36).slice(2, 8)}`, name: 'Cement 25kg', ...body } })
  if (res.statusCode !== 201) throw new Error(`create failed: ${res.statusCode} ${res.body}`)
  return res.json().item as { id: string, quantity: number, version: number }
}

const adjust = (app: FastifyInstance, user: TestUser, id: string, delta: number, reason = 'test') =>
  app.inject({ method: 'POST', url: `/stock/items/${id}/adjustments`, headers: authHeader(user), payload: { delta, reason } })

const count = (app: FastifyInstance, user: TestUser, id: string, payload: Record<string, unknown>) =>
  app.inject({ method: 'PUT', url: `/stock/items/${id}/count`, headers: authHeader(user), payload })

async function stockEvents (app: FastifyInstance, itemId: string) {
  const rows = await app.prisma.event.findMany({ where: { type: 'stock:updated' }, orderBy: { seq: 'asc' } })
  return rows.map(r => r.data as { item: { id: string }, delta?: number, movementId?: string }).filter(d => d.item.id === itemId && d.delta !== undefined)
}

t.test('200 concurrent adjustments of random deltas all apply: final quantity is start + sum, each has its event and movement', async t => {
  // The 200 transactions queue for 10 pool connections behind one row lock. Alone they take about
  // 2 s; on a 2-core CI running another test file beside this one the last waited over the 5 s
  // pool-slot bound (DATABASE_CONNECT_TIMEOUT_MS), answered 503 by design. This test is about lost
  // updates, not that bound (database-hang.test.ts covers it), so it waits longer.
  const { app, prisma } = await build(t, { db: await testDatabase(t, { connectTimeoutMs: 60_000 }) })
  const company = await createCompany(app, ['manager', 'member'])
  const start = 100_000
  const item = await createItem(app, company.as('manager'), { quantity: start })
  const deltas = Array.from({ length: 200 }, (_, i) => (Math.floor(Math.random() * 200) - 100) || (i + 1))
  const users = [company.as('manager'), company.as('member')]
  const responses = await Promise.all(deltas.map((delta, i) => adjust(app, users[i % 2]!, item.id, delta, `adj ${i}`)))
  t.same(responses.map(r => r.statusCode), deltas.map(() => 201))

  const sum = deltas.reduce((a, b) => a + b, 0)
  const row = await prisma.stockItem.findUniqueOrThrow({ where: { id: item.id } })
  t.equal(row.quantity, start + sum, 'no adjustment lost')
  t.equal(row.version, 1 + deltas.length)

  const movements = await prisma.stockMovement.findMany({ where: { itemId: item.id } })
  t.equal(movements.length, deltas.length)
  t.same(movements.map(m => m.delta).sort((a, b) => a - b), [...deltas].sort((a, b) => a - b))
  // Serialised by the row lock: in version order, each result is its predecessor's plus its delta.
  const byVersion = responses.map(r => r.json() as { item: { version: number, quantity: number }, movement: { delta: number, resultingQuantity: number } })
    .sort((a, b) => a.item.version - b.item.version)
  t.same(byVersion.map(r => r.item.version), deltas.map((_, i) => i + 2))
  let running = start
  t.ok(byVersion.every(r => (running += r.movement.delta) === r.movement.resultingQuantity && running === r.item.quantity), 'the results form one chain')

  const events = await stockEvents(app, item.id)
  t.equal(events.length, deltas.length, 'one stock:updated per adjustment')
  t.same(new Set(events.map(e => e.movementId)), new Set(movements.map(m => m.id)))
})

t.test('concurrent withdrawals never take the quantity below zero: exactly the available ones apply', async t => {
  const { app, prisma } = await build(t)
  const company = await createCompany(app, ['manager'])
  const manager = company.as('manager')
  const item = await createItem(app, manager, { quantity: 30, reorderLevel: 5 })
  const responses = await Promise.all(Array.from({ length: 60 }, () => adjust(app, manager, item.id, -1)))
  const ok = responses.filter(r => r.statusCode === 201)
  const refused = responses.filter(r => r.statusCode === 409)
  t.equal(ok.length, 30)
  t.equal(refused.length, 30)
  t.ok(refused.every(r => r.json().error.code === 'INSUFFICIENT_STOCK'))
  t.equal((await prisma.stockItem.findUniqueOrThrow({ where: { id: item.id } })).quantity, 0)
  t.equal(await prisma.stockMovement.count({ where: { itemId: item.id } }), 30)
  // Crossing the reorder level is announced once.
  t.equal(await prisma.event.count({ where: { type: 'stock:low' } }), 1)
})

t.test('a negative result is refused with 409 INSUFFICIENT_STOCK unless the item allows negative stock', async t => {
  const { app, prisma } = await build(t)
  const company = await createCompany(app, ['manager'])
  const manager = company.as('manager')
  const strict = await createItem(app, manager, { quantity: 5 })
  const refused = await adjust(app, manager, strict.id, -6)
  t.equal(refused.statusCode, 409)
  t.match(refused.json().error, { code: 'INSUFFICIENT_STOCK', message: /quantity 5, delta -6/ })
  t.equal((await prisma.stockItem.findUniqueOrThrow({ where: { id: strict.id } })).quantity, 5)
  t.equal(await prisma.stockMovement.count({ where: { itemId: strict.id } }), 0)
  t.equal((await stockEvents(app, strict.id)).length, 0, 'a refused adjustment publishes nothing')

  const loose = await createItem(app, manager, { quantity: 5, allowNegative: true })
  const applied = await adjust(app, manager, loose.id, -6)
  t.equal(applied.statusCode, 201)
  t.equal(applied.json().item.quantity, -1)

  const missing = await adjust(app, manager, 'no-such-item', 1)
  t.equal(missing.statusCode, 404)
  const zero = await adjust(app, manager, strict.id, 0)
  t.equal(zero.statusCode, 400)
})

// Regression (stock review): a refused adjustment was explained from the row read after the
// refusal; an adjustment committed in between made the answer name the wrong reason (409
// INSUFFICIENT_STOCK for an item that allows negative stock, at the quantity limit) and a quantity
// that would have been enough. The refusal is now decided on the row locked as it is: here the
// row allows the change by then, so it applies. A test-only trigger pauses the refused UPDATE
// statement so the other adjustment commits in that gap.
t.test('an adjustment refused while another one commits is decided on the row as it is then', async t => {
  const { app, prisma, db } = await build(t)
  const manager = (await createCompany(app, ['manager'])).as('manager')
  await db.withSession(sql => sql.exec(`
    CREATE FUNCTION test_pause_refused() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN IF NOT EXISTS (SELECT 1 FROM changed) THEN PERFORM pg_sleep(0.5); END IF; RETURN NULL; END $$;
    CREATE TRIGGER test_pause_refused AFTER UPDATE ON stock_items REFERENCING NEW TABLE AS changed
      FOR EACH STATEMENT EXECUTE FUNCTION test_pause_refused()`))
  const atLimit = await createItem(app, manager, { quantity: 1_000_000_000, allowNegative: true })
  const strict = await createItem(app, manager, { quantity: 0 })
  for (const [item, first, second, expected] of [[atLimit, 1, -1, 1_000_000_000], [strict, -1, 5, 4]] as const) {
    const pending = adjust(app, manager, item.id, first)
    await new Promise(resolve => setTimeout(resolve, 150))
    t.equal((await adjust(app, manager, item.id, second)).statusCode, 201)
    const res = await pending
    t.equal(res.statusCode, 201, res.body)
    t.equal(res.json().item.quantity, expected)
    t.equal((await prisma.stockItem.findUniqueOrThrow({ where: { id: item.id } })).quantity, expected)
    t.equal((await stockEvents(app, item.id)).length, 2, 'both adjustments have their event')
  }
})

t.test('an absolute count is versioned: a stale baseVersion conflicts, a current one applies and records the movement', async t => {
  const { app, prisma } = await build(t)
  const company = await createCompany(app, ['manager', 'member'])
  const manager = company.as('manager')
  const item = await createItem(app, manager, { quantity: 10 })
  await adjust(app, company.as('member'), item.id, -3) // version 2, quantity 7

  const stale = await count(app, manager, item.id, { quantity: 12, baseVersion: 1 })
  t.equal(stale.statusCode, 409)
  t.match(stale.json(), { error: { code: 'CONFLICT' }, fields: ['quantity'], current: { quantity: 7, version: 2 }, base: { quantity: 10, version: 1 }, yours: { quantity: 12 } })

  // Counting the base quantity again is still an observation that conflicts with the withdrawal.
  const sameAsBase = await count(app, manager, item.id, { quantity: 10, baseVersion: 1 })
  t.equal(sameAsBase.statusCode, 409)

  const current = await count(app, manager, item.id, { quantity: 12, baseVersion: 2, reason: 'stocktake' })
  t.equal(current.statusCode, 200)
  t.match(current.json(), { merged: false, item: { quantity: 12, version: 3 } })
  const movement = await prisma.stockMovement.findFirstOrThrow({ where: { itemId: item.id, reason: 'stocktake' } })
  t.match(movement, { delta: 5, resultingQuantity: 12 })

  const viaIfMatch = await app.inject({ method: 'PUT', url: `/stock/items/${item.id}/count`, headers: { ...authHeader(manager), 'if-match': '"3"' }, payload: { quantity: 11 } })
  t.equal(viaIfMatch.statusCode, 200)
  t.equal(viaIfMatch.json().item.version, 4)
})

t.test('counts racing adjustments: every adjustment survives, a count applies only on the version it saw', async t => {
  const { app, prisma } = await build(t)
  const company = await createCompany(app, ['manager'])
  const manager = company.as('manager')
  const item = await createItem(app, manager, { quantity: 1000 })
  const adjustments = Array.from({ length: 40 }, (_, i) => adjust(app, manager, item.id, i % 2 === 0 ? 2 : -1))
  const counts = Array.from({ length: 10 }, (_, i) => count(app, manager, item.id, { quantity: 500 + i, baseVersion: 1 }))
  const [adj, cnt] = await Promise.all([Promise.all(adjustments), Promise.all(counts)])
  t.ok(adj.every(r => r.statusCode === 201))
  t.ok(cnt.every(r => r.statusCode === 200 || r.statusCode === 409))
  const applied = cnt.filter(r => r.statusCode === 200)
  t.ok(applied.length <= 1, 'at most one count applies on version 1')
  const movements = await prisma.stockMovement.findMany({ where: { itemId: item.id } })
  t.equal(movements.length, 40 + applied.length)
  const row = await prisma.stockItem.findUniqueOrThrow({ where: { id: item.id } })
  // The row equals the start plus every recorded movement: nothing was overwritten.
  t.equal(row.quantity, 1000 + movements.reduce((a, m) => a + m.delta, 0))
  t.equal(row.version, 1 + movements.length)
})

t.test('expenses: approving twice or approving a rejected expense answers 409 INVALID_TRANSITION', async t => {
  const { app, prisma } = await build(t)
  const company = await createCompany(app, ['manager', 'member'])
  const manager = company.as('manager')
  const member = company.as('member')
  const submit = async () => {
    const res = await app.inject({ method: 'POST', url: '/expenses', headers: authHeader(member), payload: { amountMinor: 1250, currency: 'EUR', description: 'Fuel' } })
    t.equal(res.statusCode, 201)
    return res.json().expense as { id: string }
  }
  const decide = (id: string, action: string, user = manager) => app.inject({ method: 'POST', url: `/expenses/${id}/${action}`, headers: authHeader(user), payload: {} })

  const first = await submit()
  t.equal((await decide(first.id, 'approve', member)).statusCode, 403, 'members cannot approve')
  const approved = await decide(first.id, 'approve')
  t.equal(approved.statusCode, 200)
  t.match(approved.json().expense, { status: 'approved', version: 2 })
  const again = await decide(first.id, 'approve')
  t.equal(again.statusCode, 409)
  t.match(again.json().error, { code: 'INVALID_TRANSITION', message: /approve an expense that is approved/ })

  const second = await submit()
  t.equal((await decide(second.id, 'reject')).statusCode, 200)
  const afterReject = await decide(second.id, 'approve')
  t.equal(afterReject.statusCode, 409)
  t.match(afterReject.json().error, { code: 'INVALID_TRANSITION', message: /approve an expense that is rejected/ })
  t.equal((await decide('no-such-expense', 'approve')).statusCode, 404)

  // Racing decisions: exactly one wins; the event log has exactly one decision.
  const third = await submit()
  const race = await Promise.all([...Array.from({ length: 5 }, () => decide(third.id, 'approve')), ...Array.from({ length: 5 }, () => decide(third.id, 'reject'))])
  t.equal(race.filter(r => r.statusCode === 200).length, 1)
  t.ok(race.filter(r => r.statusCode !== 200).every(r => r.statusCode === 409 && r.json().error.code === 'INVALID_TRANSITION'))
  const decisions = await prisma.event.findMany({ where: { type: { in: ['expense:approved', 'expense:rejected'] } } })
  t.equal(decisions.filter(e => (e.data as { expense: { id: string } }).expense.id === third.id).length, 1)
})
