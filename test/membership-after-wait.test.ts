import t, { type Test } from 'tap'
import pg from 'pg'
import type { FastifyInstance, LightMyRequestResponse } from 'fastify'
import { authHeader, build, createCompany, testDatabase, waitFor, type TestCompany, type TestUser } from './helpers.ts'
import { companyStream } from '../plugins/events.ts'

// Routes that check the membership before their handler (the default, 'before') pass the same
// check as a guard to their write, evaluated again before it commits. A request can wait a long
// time between the two: in a row's update queue, on a row lock, for a pooled connection. A member
// removed (or demoted) meanwhile must not get its change committed, nor be answered with the
// company's data. Regression for writes that committed after the membership was gone.

type Change = (prisma: TestApp['prisma'], company: TestCompany, user: TestUser) => Promise<unknown>
type TestApp = Awaited<ReturnType<typeof build>>

const removeMembership: Change = (prisma, company, user) =>
  prisma.membership.delete({ where: { userId_companyId: { userId: user.id, companyId: company.id } } })
const deactivate: Change = (prisma, _company, user) => prisma.user.update({ where: { id: user.id }, data: { active: false } })
const demoteToMember: Change = (prisma, company, user) =>
  prisma.membership.update({ where: { userId_companyId: { userId: user.id, companyId: company.id } }, data: { role: 'member' } })

async function setup (t: Test) {
  const db = await testDatabase(t)
  const built = await build(t, { db })
  const company = await createCompany(built.app, ['admin', 'manager', 'member'])
  // Another session that holds what the request will wait for.
  const holder = new pg.Client({ connectionString: db.url })
  await holder.connect()
  t.teardown(() => holder.end())
  const waitingOnLock = () => waitFor(async () => (await holder.query(
    `SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`)).rows[0]!.n > 0,
  5000, 'the request to wait for the lock')
  return { ...built, url: db.url, company, holder, waitingOnLock }
}

const request = (app: FastifyInstance, user: TestUser, method: 'POST' | 'PATCH' | 'PUT', url: string, payload: object, headers: Record<string, string> = {}) =>
  app.inject({ method, url, headers: { ...authHeader(user), ...headers }, payload })

async function createProject (app: FastifyInstance, user: TestUser, name: string) {
  return (await request(app, user, 'POST', '/projects', { name })).json().project as { id: string, version: number }
}
async function createItem (app: FastifyInstance, user: TestUser, sku: string) {
  return (await request(app, user, 'POST', '/stock/items', { sku, name: sku, quantity: 10 })).json().item as { id: string, version: number }
}

const advisoryLock = (companyId: string, entity: string, id: string) =>
  `SELECT pg_advisory_xact_lock(hashtextextended('erp-conflicts:${companyId}:${entity}:${id}', 0))`

/**
 * Holds `lock` in the holder's transaction, sends the request, waits until it waits for the
 * lock, applies `change` to the caller's membership, releases the lock (`release`), and
 * returns the answer.
 */
async function afterWait (s: Awaited<ReturnType<typeof setup>>, lock: { sql: string, params?: unknown[], release?: 'COMMIT' | 'ROLLBACK' },
  send: () => Promise<LightMyRequestResponse>, change: () => Promise<unknown>) {
  await s.holder.query('BEGIN')
  await s.holder.query(lock.sql, lock.params)
  const answer = send()
  await s.waitingOnLock()
  await change()
  await s.holder.query(lock.release ?? 'COMMIT')
  return await answer
}

const eventTypes = async (app: FastifyInstance, companyId: string) =>
  (await app.eventLog.read(companyStream(companyId), 0, 100)).map(e => e.type)

t.test('PATCH /projects/:id by a member removed while it waited in the row\'s queue: 403, nothing written, no event', async t => {
  const s = await setup(t)
  const { app, prisma, company } = s
  const member = company.as('member')
  const project = await createProject(app, company.as('admin'), 'kept')
  const answer = await afterWait(s, { sql: advisoryLock(company.id, 'project', project.id) },
    () => request(app, member, 'PATCH', `/projects/${project.id}`, { baseVersion: 1, name: 'renamed by a former member' }),
    () => removeMembership(prisma, company, member))
  t.equal(answer.statusCode, 403)
  t.equal(answer.json().error.code, 'AUTH_NOT_A_MEMBER')
  t.match(await prisma.project.findUnique({ where: { id: project.id } }), { name: 'kept', version: 1 })
  t.same(await eventTypes(app, company.id), ['project:created'])
})

t.test('a stale PATCH by a member removed while it waited gets 403, not the 409 that carries the current row', async t => {
  const s = await setup(t)
  const { app, prisma, company } = s
  const member = company.as('member')
  const project = await createProject(app, company.as('admin'), 'v1')
  t.equal((await request(app, company.as('admin'), 'PATCH', `/projects/${project.id}`, { baseVersion: 1, name: 'v2 (confidential)' })).statusCode, 200)
  const answer = await afterWait(s, { sql: advisoryLock(company.id, 'project', project.id) },
    () => request(app, member, 'PATCH', `/projects/${project.id}`, { baseVersion: 1, name: 'stale edit' }),
    () => removeMembership(prisma, company, member))
  t.equal(answer.statusCode, 403)
  t.equal(answer.json().error.code, 'AUTH_NOT_A_MEMBER')
  t.notMatch(answer.body, 'confidential', 'the current row is not in the answer')
  t.equal(await prisma.event.count({ where: { type: 'conflict:detected' } }), 0, 'no conflict was recorded')
})

t.test('PUT /stock/items/:id/count by a deactivated user who waited in the row\'s queue: 403, the count not applied', async t => {
  const s = await setup(t)
  const { app, prisma, company } = s
  const member = company.as('member')
  const item = await createItem(app, company.as('manager'), 'COUNT-1')
  const answer = await afterWait(s, { sql: advisoryLock(company.id, 'stockItem', item.id) },
    () => request(app, member, 'PUT', `/stock/items/${item.id}/count`, { quantity: 3, baseVersion: 1 }),
    () => deactivate(prisma, company, member))
  t.equal(answer.statusCode, 403)
  t.equal(answer.json().error.code, 'AUTH_NOT_A_MEMBER')
  t.match(await prisma.stockItem.findUnique({ where: { id: item.id } }), { quantity: 10, version: 1 })
  t.equal(await prisma.stockMovement.count({ where: { itemId: item.id } }), 0)
})

for (const idempotent of [false, true]) {
  t.test(`POST /stock/items/:id/adjustments${idempotent ? ' with an Idempotency-Key' : ''} by a member removed while it waited on the row lock: 403, the quantity unchanged`, async t => {
    const s = await setup(t)
    const { app, prisma, company } = s
    const member = company.as('member')
    const item = await createItem(app, company.as('manager'), 'ADJ-1')
    const headers: Record<string, string> = idempotent ? { 'idempotency-key': 'adjust-after-removal' } : {}
    const answer = await afterWait(s, { sql: 'SELECT 1 FROM stock_items WHERE id = $1 FOR UPDATE', params: [item.id] },
      () => request(app, member, 'POST', `/stock/items/${item.id}/adjustments`, { delta: -4, reason: 'taken' }, headers),
      () => removeMembership(prisma, company, member))
    t.equal(answer.statusCode, 403)
    t.equal(answer.json().error.code, 'AUTH_NOT_A_MEMBER')
    t.match(await prisma.stockItem.findUnique({ where: { id: item.id } }), { quantity: 10, version: 1 })
    t.equal(await prisma.stockMovement.count({ where: { itemId: item.id } }), 0)
    t.same(await eventTypes(app, company.id), ['stock:updated'], 'only the create\'s event')
    if (idempotent) {
      // The refusal is the key's answer; its change never committed, so its fence was not marked.
      const record = await prisma.idempotencyRecord.findFirst({ where: { key: 'adjust-after-removal' } })
      t.match(record, { statusCode: 403, committedAt: null })
    }
  })
}

t.test('POST /expenses/:id/approve by a manager demoted while it waited on the expense: 403 FORBIDDEN, still submitted', async t => {
  const s = await setup(t)
  const { app, prisma, company } = s
  const manager = company.as('manager')
  const expense = (await request(app, company.as('member'), 'POST', '/expenses', { amountMinor: 100, currency: 'EUR', description: 'taxi' })).json().expense as { id: string }
  const answer = await afterWait(s, { sql: 'SELECT 1 FROM expenses WHERE id = $1 FOR UPDATE', params: [expense.id] },
    () => request(app, manager, 'POST', `/expenses/${expense.id}/approve`, {}),
    () => demoteToMember(prisma, company, manager))
  t.equal(answer.statusCode, 403)
  t.equal(answer.json().error.code, 'FORBIDDEN')
  t.match(await prisma.expense.findUnique({ where: { id: expense.id } }), { status: 'submitted', approverId: null, version: 1 })
  t.same(await eventTypes(app, company.id), ['expense:submitted'])
})

t.test('POST /expenses for a project by a user deactivated while it waited on the project: 403, no expense', async t => {
  const s = await setup(t)
  const { app, prisma, company } = s
  const member = company.as('member')
  const project = await createProject(app, company.as('admin'), 'site')
  const answer = await afterWait(s, { sql: 'SELECT 1 FROM projects WHERE id = $1 FOR UPDATE', params: [project.id] },
    () => request(app, member, 'POST', '/expenses', { amountMinor: 100, currency: 'EUR', description: 'taxi', projectId: project.id }),
    () => deactivate(prisma, company, member))
  t.equal(answer.statusCode, 403)
  t.equal(answer.json().error.code, 'AUTH_NOT_A_MEMBER')
  t.equal(await prisma.expense.count({ where: { companyId: company.id } }), 0)
  t.same(await eventTypes(app, company.id), ['project:created'])
})

t.test('POST /stock/items by a member removed while its insert waited on the SKU\'s unique index: 403, no item', async t => {
  const s = await setup(t)
  const { app, prisma, company } = s
  const member = company.as('member')
  // Another transaction inserted the SKU and rolls back: the route's insert waits, then goes through.
  const answer = await afterWait(s, {
    sql: 'INSERT INTO stock_items (id, "companyId", sku, name, "updatedAt") VALUES (gen_random_uuid()::text, $1, $2, $2, now())',
    params: [company.id, 'SKU-RACE'],
    release: 'ROLLBACK'
  },
  () => request(app, member, 'POST', '/stock/items', { sku: 'SKU-RACE', name: 'race' }),
  () => removeMembership(prisma, company, member))
  t.equal(answer.statusCode, 403)
  t.equal(answer.json().error.code, 'AUTH_NOT_A_MEMBER')
  t.equal(await prisma.stockItem.count({ where: { companyId: company.id } }), 0)
  t.same(await eventTypes(app, company.id), [])
})

t.test('members whose membership is unchanged still commit after waiting (the guard passes with the stored role)', async t => {
  const s = await setup(t)
  const { app, company } = s
  const manager = company.as('manager')
  const item = await createItem(app, manager, 'OK-1')
  const answer = await afterWait(s, { sql: 'SELECT 1 FROM stock_items WHERE id = $1 FOR UPDATE', params: [item.id] },
    () => request(app, manager, 'POST', `/stock/items/${item.id}/adjustments`, { delta: 5, reason: 'delivery' }),
    async () => {})
  t.equal(answer.statusCode, 201)
  t.match(answer.json().item, { quantity: 15, version: 2 })
})

// Regression (review of the guard): the guard ran only as the transaction's last statement, so a
// route that failed before it (a 409 built from the row it read) answered a removed member with
// the company's data.
t.test('a write that fails after the wait answers a member removed meanwhile with 403, not the 409 built from what it read', async t => {
  const s = await setup(t)
  const { app, prisma, company } = s
  const member = company.as('member')
  const item = await createItem(app, company.as('manager'), 'ADJ-2')
  // The other transaction takes the row and lowers the quantity: the adjustment then fails as INSUFFICIENT_STOCK.
  const lower = { sql: 'UPDATE stock_items SET quantity = 2 WHERE id = $1', params: [item.id] }
  const refused = await afterWait(s, lower,
    () => request(app, member, 'POST', `/stock/items/${item.id}/adjustments`, { delta: -5, reason: 'taken' }),
    () => removeMembership(prisma, company, member))
  t.equal(refused.statusCode, 403)
  t.equal(refused.json().error.code, 'AUTH_NOT_A_MEMBER')
  t.notMatch(refused.body, 'quantity 2', 'nothing read after the wait is in the answer')

  // A member still in the company gets the route's own answer.
  const manager = company.as('manager')
  // (The route waits only if the row it sees, quantity 2, would take the adjustment.)
  const answered = await afterWait(s, { sql: 'UPDATE stock_items SET quantity = 0 WHERE id = $1', params: [item.id] },
    () => request(app, manager, 'POST', `/stock/items/${item.id}/adjustments`, { delta: -1, reason: 'taken' }),
    async () => {})
  t.equal(answered.statusCode, 409)
  t.equal(answered.json().error.code, 'INSUFFICIENT_STOCK')
})

t.test('an expense decision that fails after the wait answers a manager removed meanwhile with 403, not INVALID_TRANSITION', async t => {
  const s = await setup(t)
  const { app, prisma, company } = s
  const manager = company.as('manager')
  const expense = (await request(app, company.as('member'), 'POST', '/expenses', { amountMinor: 100, currency: 'EUR', description: 'taxi' })).json().expense as { id: string }
  const answer = await afterWait(s, { sql: `UPDATE expenses SET status = 'rejected' WHERE id = $1`, params: [expense.id] },
    () => request(app, manager, 'POST', `/expenses/${expense.id}/approve`, {}),
    () => removeMembership(prisma, company, manager))
  t.equal(answer.statusCode, 403)
  t.equal(answer.json().error.code, 'AUTH_NOT_A_MEMBER')
})

// Regression: the in-write routes checked the membership before their statement's lock waits.
// POST /projects' one statement evaluated its guard before waiting for the company's stream
// head (held until commit by every transaction publishing to the company), and DELETE
// /projects/:id checked in the statement that then waited for the project row: a member
// removed during either wait still committed.
t.test('POST /projects by a member removed while its statement waited on the company\'s stream head: 403, no project, no event', async t => {
  const s = await setup(t)
  const { app, prisma, company } = s
  const member = company.as('member')
  await createProject(app, company.as('admin'), 'first')
  const answer = await afterWait(s, { sql: 'SELECT 1 FROM stream_heads WHERE stream = $1 FOR UPDATE', params: [companyStream(company.id)] },
    () => request(app, member, 'POST', '/projects', { name: 'by a former member' }),
    () => removeMembership(prisma, company, member))
  t.equal(answer.statusCode, 403, answer.body)
  t.equal(answer.json().error.code, 'AUTH_NOT_A_MEMBER')
  t.equal(await prisma.project.count({ where: { companyId: company.id } }), 1)
  t.same(await eventTypes(app, company.id), ['project:created'])
})

t.test('DELETE /projects/:id by a member removed while it waited for the project row: 403, the project kept, no event', async t => {
  const s = await setup(t)
  const { app, prisma, company } = s
  const member = company.as('member')
  const project = await createProject(app, company.as('admin'), 'kept')
  const answer = await afterWait(s, { sql: 'SELECT 1 FROM projects WHERE id = $1 FOR UPDATE', params: [project.id] },
    () => app.inject({ method: 'DELETE', url: `/projects/${project.id}`, headers: authHeader(member) }),
    () => removeMembership(prisma, company, member))
  t.equal(answer.statusCode, 403)
  t.equal(answer.json().error.code, 'AUTH_NOT_A_MEMBER')
  t.ok(await prisma.project.findUnique({ where: { id: project.id } }), 'not deleted')
  t.same(await eventTypes(app, company.id), ['project:created'])
})

// The Idempotency-Key fence marks its claim committed with an UPDATE, which waits for the
// claim's row lock; the guard beside it was evaluated first.
t.test('a write under an Idempotency-Key by a member removed while its fence waited for the claim row: 403, nothing written', async t => {
  const s = await setup(t)
  const { app, prisma, company } = s
  const member = company.as('member')
  const project = await createProject(app, company.as('admin'), 'kept')
  const rowHolder = new pg.Client({ connectionString: s.url })
  await rowHolder.connect()
  t.teardown(() => rowHolder.end())
  // The PATCH first waits in the project's queue; meanwhile its claim row exists and is locked.
  await s.holder.query('BEGIN')
  await s.holder.query(advisoryLock(company.id, 'project', project.id))
  const answer = request(app, member, 'PATCH', `/projects/${project.id}`, { baseVersion: 1, name: 'renamed by a former member' }, { 'idempotency-key': 'fence-wait' })
  await s.waitingOnLock()
  await rowHolder.query('BEGIN')
  const locked = await rowHolder.query('SELECT 1 FROM idempotency_records WHERE "userId" = $1 AND key = $2 FOR UPDATE', [member.id, 'fence-wait'])
  t.equal(locked.rowCount, 1, 'the claim row is there to lock')
  await s.holder.query('COMMIT')
  await s.waitingOnLock()
  await removeMembership(prisma, company, member)
  await rowHolder.query('COMMIT')
  const res = await answer
  t.equal(res.statusCode, 403)
  t.equal(res.json().error.code, 'AUTH_NOT_A_MEMBER')
  t.match(await prisma.project.findUnique({ where: { id: project.id } }), { name: 'kept', version: 1 })
  t.same(await eventTypes(app, company.id), ['project:created'])
})
