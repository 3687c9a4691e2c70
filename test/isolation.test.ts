import t, { type Test } from 'tap'
import type { FastifyInstance } from 'fastify'
import type { Socket as ClientSocket } from 'socket.io-client'
import type { Envelope } from '../plugins/events.ts'
import { authHeader, build, connect, createCompany, record, testDatabase, waitFor, type TestCompany, type TestUser } from './helpers.ts'

const DOMAIN_EVENTS = new Set([
  'project:created', 'project:updated', 'project:deleted',
  'expense:submitted', 'expense:approved', 'expense:rejected',
  'stock:updated', 'stock:low', 'notification:new', 'conflict:detected'
])

interface Client {
  name: string
  user: TestUser
  socket: ClientSocket
  seen: Array<{ event: string, payload: any }>
}

const domainEvents = (client: Client) => client.seen.filter(e => DOMAIN_EVENTS.has(e.event))

async function call (app: FastifyInstance, user: TestUser, method: 'GET' | 'POST' | 'PATCH' | 'PUT' | 'DELETE', url: string, payload?: object) {
  return await app.inject({ method, url, headers: authHeader(user), ...(payload ? { payload } : {}) })
}

/** Runs every domain route once in `company`, returning what each step must have published. */
async function runEveryRoute (t: Test, app: FastifyInstance, company: TestCompany) {
  const admin = company.as('admin')
  const manager = company.as('manager')
  const member = company.as('member')
  const ok = async (res: Awaited<ReturnType<typeof call>>, status: number, what: string) => {
    t.equal(res.statusCode, status, `${company.name}: ${what}`)
    return res.statusCode === 204 ? undefined : res.json()
  }

  const { project } = await ok(await call(app, admin, 'POST', '/projects', { name: 'Tower' }), 201, 'create project')
  await ok(await call(app, manager, 'PATCH', `/projects/${project.id}`, { baseVersion: 1, name: 'Tower II' }), 200, 'update project')
  await ok(await call(app, admin, 'DELETE', `/projects/${project.id}`), 204, 'delete project')

  const { expense: memberExpense } = await ok(await call(app, member, 'POST', '/expenses', { amountMinor: 1250, currency: 'EUR', description: 'Taxi' }), 201, 'member submits')
  const { expense: adminExpense } = await ok(await call(app, admin, 'POST', '/expenses', { amountMinor: 990, currency: 'EUR', description: 'Lunch' }), 201, 'admin submits')

  const forbidden = await call(app, member, 'POST', `/expenses/${memberExpense.id}/approve`)
  t.equal(forbidden.statusCode, 403, 'a member may not approve')
  t.equal(forbidden.json().error.code, 'FORBIDDEN')
  const forbiddenReject = await call(app, member, 'POST', `/expenses/${adminExpense.id}/reject`, {})
  t.equal(forbiddenReject.statusCode, 403, 'a member may not reject')
  t.equal(forbiddenReject.json().error.code, 'FORBIDDEN')

  await ok(await call(app, manager, 'POST', `/expenses/${memberExpense.id}/approve`), 200, 'manager approves')
  await ok(await call(app, admin, 'POST', `/expenses/${adminExpense.id}/reject`, { reason: 'no receipt' }), 200, 'admin rejects')

  const { item } = await ok(await call(app, admin, 'POST', '/stock/items', { sku: 'CEM-25', name: 'Cement', quantity: 10, reorderLevel: 5 }), 201, 'create stock item')
  await ok(await call(app, member, 'POST', `/stock/items/${item.id}/adjustments`, { delta: -3, reason: 'used' }), 201, 'adjust above reorder level')
  await ok(await call(app, member, 'POST', `/stock/items/${item.id}/adjustments`, { delta: -4, reason: 'used' }), 201, 'adjust crossing the reorder level')
  await ok(await call(app, manager, 'PUT', `/stock/items/${item.id}/count`, { quantity: 20, baseVersion: 3 }), 200, 'count up')
  await ok(await call(app, manager, 'PUT', `/stock/items/${item.id}/count`, { quantity: 2, baseVersion: 4 }), 200, 'count crossing the reorder level')
  await ok(await call(app, member, 'POST', `/stock/items/${item.id}/adjustments`, { delta: -1, reason: 'used' }), 201, 'adjust already below: no second stock:low')

  const companyEvents = [
    'project:created', 'project:updated', 'project:deleted',
    'expense:submitted', 'expense:submitted',
    'expense:approved', 'expense:rejected',
    'stock:updated', 'stock:updated', 'stock:updated', 'stock:low', 'stock:updated', 'stock:updated', 'stock:low', 'stock:updated'
  ]
  return { companyEvents, memberExpense, adminExpense }
}

t.test('every domain event reaches exactly the clients of its company, and notifications only their user', async t => {
  const { app, url, prisma } = await build(t)
  const companies = [await createCompany(app), await createCompany(app)]
  const clients = new Map<string, Client[]>()
  for (const company of companies) {
    const admin = company.as('admin')
    const member = company.as('member')
    const list: Client[] = []
    // Two devices of the same admin and one of the member.
    for (const [name, user] of [['admin phone', admin], ['admin laptop', admin], ['member', member]] as const) {
      const socket = await connect(t, url, user.token)
      list.push({ name: `${company.name} ${name}`, user, socket, seen: record(socket) })
    }
    clients.set(company.id, list)
  }

  // Both companies work at the same time.
  const results = await Promise.all(companies.map(company => runEveryRoute(t, app, company)))

  // A sentinel published after everything else: once each socket has it, anything that
  // leaked to that socket would already have arrived before it (one socket, one ordered stream).
  for (const company of companies) {
    const res = await call(app, company.as('admin'), 'POST', '/projects', { name: 'sentinel' })
    t.equal(res.statusCode, 201)
  }
  const all = [...clients.values()].flat()
  await waitFor(() => all.every(c => c.seen.some(e => e.event === 'project:created' && e.payload.data.project.name === 'sentinel')), 5000, 'sentinels')

  for (const [i, company] of companies.entries()) {
    const { companyEvents, memberExpense, adminExpense } = results[i]!
    const withSentinel = [...companyEvents, 'project:created']
    // Notifications interleave where they were published: right after the decision on their expense.
    const expectedFor = (userRole: 'admin' | 'member') => {
      const list = [...withSentinel]
      const after = userRole === 'member' ? list.indexOf('expense:approved') : list.indexOf('expense:rejected')
      list.splice(after + 1, 0, 'notification:new')
      return list
    }
    for (const client of clients.get(company.id)!) {
      const events = domainEvents(client)
      const role = client.user.role === 'member' ? 'member' : 'admin'
      t.same(events.map(e => e.event), expectedFor(role), `${client.name}: exactly its company's events, in order`)
      t.ok(events.every(e => e.payload.companyId === company.id), `${client.name}: all envelopes carry its companyId`)

      const companyStream = events.filter(e => e.payload.stream === `company:${company.id}`)
      t.same(companyStream.map(e => e.payload.seq), companyStream.map((_e, n) => n + 1), `${client.name}: company seq contiguous from 1`)
      const notifications = events.filter(e => e.event === 'notification:new')
      t.equal(notifications.length, 1)
      const notification = notifications[0]!.payload as Envelope<any>
      t.equal(notification.stream, `user:${client.user.id}`, `${client.name}: notification on its own user stream`)
      t.equal(notification.seq, 1)
      const expense = role === 'member' ? memberExpense : adminExpense
      t.same(notification.data.ref, { type: 'expense', id: expense.id })
      t.equal(notification.data.kind, role === 'member' ? 'expense:approved' : 'expense:rejected')
    }

    // The envelope shape of one event, in full.
    const member = clients.get(company.id)!.find(c => c.user.role === 'member')!
    const created = domainEvents(member)[0]!.payload as Envelope<any>
    t.match(created, {
      id: String,
      stream: `company:${company.id}`,
      seq: 1,
      type: 'project:created',
      companyId: company.id,
      at: String,
      actor: { userId: company.as('admin').id },
      data: { project: { name: 'Tower', companyId: company.id, version: 1 } }
    })
    t.ok(!Number.isNaN(Date.parse(created.at)), 'at is a timestamp')
    const low = domainEvents(member).find(e => e.event === 'stock:low')!.payload
    t.match(low.data, { reorderLevel: 5, item: { quantity: 3 } })
  }

  // Ids are unique across streams and companies.
  const ids = all.flatMap(c => domainEvents(c).map(e => e.payload.id))
  t.equal(new Set(ids).size, new Set(all.flatMap(c => domainEvents(c).map(e => `${e.payload.stream}/${e.payload.seq}`))).size)

  // What the sockets saw is what the log recorded.
  for (const company of companies) {
    t.equal(await prisma.event.count({ where: { stream: `company:${company.id}` } }), results[0]!.companyEvents.length + 1)
    t.equal(await prisma.event.count({ where: { companyId: company.id, type: 'notification:new' } }), 2)
  }

  const expenseAfter = await prisma.expense.findUniqueOrThrow({ where: { id: results[0]!.memberExpense.id } })
  t.equal(expenseAfter.approverId, companies[0]!.as('manager').id, 'the forbidden member attempt did not record an approver')
})

t.test("another company's ids over HTTP answer 404 and change nothing", async t => {
  const { app, url, prisma } = await build(t)
  const a = await createCompany(app)
  const b = await createCompany(app)
  const adminA = a.as('admin')
  const adminB = b.as('admin')

  const project = (await call(app, adminA, 'POST', '/projects', { name: 'Secret', budgetMinor: 100 })).json().project
  const expense = (await call(app, a.as('member'), 'POST', '/expenses', { amountMinor: 500, currency: 'USD', description: 'Hotel' })).json().expense
  const item = (await call(app, adminA, 'POST', '/stock/items', { sku: 'X-1', name: 'Bolt', quantity: 50, reorderLevel: 10 })).json().item

  const socketA = await connect(t, url, adminA.token)
  const socketB = await connect(t, url, adminB.token)
  const seenA = record(socketA)
  const seenB = record(socketB)
  const eventsBefore = await prisma.event.count()
  const headsBefore = await prisma.streamHead.findMany({ orderBy: { stream: 'asc' } })

  const attempts: Array<[string, 'GET' | 'POST' | 'PATCH' | 'PUT' | 'DELETE', string, object | undefined]> = [
    ['GET project', 'GET', `/projects/${project.id}`, undefined],
    ['PATCH project', 'PATCH', `/projects/${project.id}`, { baseVersion: 1, name: 'Stolen' }],
    ['DELETE project', 'DELETE', `/projects/${project.id}`, undefined],
    ['GET expense', 'GET', `/expenses/${expense.id}`, undefined],
    ['approve expense', 'POST', `/expenses/${expense.id}/approve`, undefined],
    ['reject expense', 'POST', `/expenses/${expense.id}/reject`, { reason: 'mine now' }],
    ['GET stock item', 'GET', `/stock/items/${item.id}`, undefined],
    ['adjust stock', 'POST', `/stock/items/${item.id}/adjustments`, { delta: -50, reason: 'theft' }],
    ['count stock', 'PUT', `/stock/items/${item.id}/count`, { quantity: 0, baseVersion: 1 }],
    ['expense on a foreign project', 'POST', '/expenses', { amountMinor: 1, currency: 'USD', description: 'x', projectId: project.id }]
  ]
  for (const [name, method, path, payload] of attempts) {
    const res = await call(app, adminB, method, path, payload)
    t.equal(res.statusCode, 404, `${name}: 404`)
    t.equal(res.json().error.code, 'NOT_FOUND', `${name}: NOT_FOUND`)
    t.notMatch(res.body, /Secret|Hotel|Bolt/, `${name}: leaks nothing`)
  }

  // Lists are scoped too.
  t.same((await call(app, adminB, 'GET', '/projects')).json().projects, [])
  t.same((await call(app, adminB, 'GET', '/expenses')).json().expenses, [])
  t.same((await call(app, adminB, 'GET', '/stock/items')).json().items, [])

  // Nothing changed in the database, nothing was recorded, nothing was sent.
  const projectAfter = await prisma.project.findUniqueOrThrow({ where: { id: project.id } })
  t.match(projectAfter, { name: 'Secret', version: 1, companyId: a.id })
  const expenseAfter = await prisma.expense.findUniqueOrThrow({ where: { id: expense.id } })
  t.match(expenseAfter, { status: 'submitted', approverId: null, version: 1 })
  const itemAfter = await prisma.stockItem.findUniqueOrThrow({ where: { id: item.id } })
  t.match(itemAfter, { quantity: 50, version: 1 })
  t.equal(await prisma.stockMovement.count({ where: { itemId: item.id } }), 0)
  t.equal(await prisma.event.count(), eventsBefore, 'no event recorded')
  t.same(await prisma.streamHead.findMany({ orderBy: { stream: 'asc' } }), headsBefore, 'no stream head moved')

  // The owner still can, and sockets get exactly that.
  const own = await call(app, adminA, 'PATCH', `/projects/${project.id}`, { baseVersion: 1, name: 'Public' })
  t.equal(own.statusCode, 200)
  await waitFor(() => seenA.some(e => e.event === 'project:updated'), 5000, 'the owner update event')
  const domain = (seen: typeof seenA) => seen.filter(e => DOMAIN_EVENTS.has(e.event))
  t.same(domain(seenA).map(e => e.event), ['project:updated'], 'company A saw only its own update')
  t.same(domain(seenB), [], 'company B saw nothing')
})

t.test('regression: a submitter who left the company gets no notification about its expenses on their user stream', async t => {
  const { app, url, prisma } = await build(t)
  const acme = await createCompany(app)
  const globex = await createCompany(app, ['admin'])
  // One person in both companies: they submit in acme, then leave acme.
  const person = acme.as('member')
  await prisma.membership.create({ data: { userId: person.id, companyId: globex.id, role: 'member' } })
  const globexToken = app.erpAuth.sign({ sub: person.id, companyId: globex.id, role: 'member' })
  const submitted = await call(app, person, 'POST', '/expenses', { amountMinor: 990, currency: 'EUR', description: 'hotel' })
  t.equal(submitted.statusCode, 201)
  await prisma.membership.delete({ where: { userId_companyId: { userId: person.id, companyId: acme.id } } })
  const socket = await connect(t, url, globexToken)
  const seen = record(socket)
  const approved = await call(app, acme.as('manager'), 'POST', `/expenses/${submitted.json().expense.id}/approve`)
  t.equal(approved.statusCode, 200)
  await waitFor(async () => (await prisma.event.count({ where: { companyId: acme.id, type: 'expense:approved' } })) === 1, 2000, 'approval recorded')
  t.equal(await prisma.event.count({ where: { stream: `user:${person.id}` } }), 0, 'nothing recorded on their user stream')
  t.same(seen.filter(e => DOMAIN_EVENTS.has(e.event)), [], 'their other company\'s session received nothing')
})

t.test('regression: concurrent decisions on one expense with a small pool neither deadlock nor double-apply (membership check took a second connection inside the transaction)', async t => {
  const db = await testDatabase(t, { poolSize: 2 })
  const { app } = await build(t, { db })
  const company = await createCompany(app)
  const submitted = await call(app, company.as('member'), 'POST', '/expenses', { amountMinor: 500, currency: 'EUR', description: 'tolls' })
  const id = submitted.json().expense.id
  const results = await Promise.all(Array.from({ length: 6 }, (_, i) => call(app, company.as('manager'), 'POST', `/expenses/${id}/${i % 2 ? 'approve' : 'reject'}`)))
  t.same(results.map(r => r.statusCode).sort(), [200, 409, 409, 409, 409, 409])
  t.equal(await app.prisma.event.count({ where: { stream: `user:${company.as('member').id}`, type: 'notification:new' } }), 1)
})
