import t, { type Test } from 'tap'
import type { FastifyInstance } from 'fastify'
import { buildApp } from '../src/app.ts'
import type { ConflictContext, ErpConflictsOptions } from '../plugins/conflict-resolution/index.ts'
import { authHeader, build, connect, createCompany, nextEvent, testConfig, testDatabase, type TestUser } from './helpers.ts'

async function createProject (app: FastifyInstance, user: TestUser, body: Record<string, unknown> = {}) {
  const res = await app.inject({ method: 'POST', url: '/projects', headers: authHeader(user), payload: { name: 'Site A', budgetMinor: 1000, ...body } })
  if (res.statusCode !== 201) throw new Error(`create failed: ${res.statusCode} ${res.body}`)
  return res.json().project as { id: string, version: number, name: string, budgetMinor: number, description: string }
}

const patch = (app: FastifyInstance, user: TestUser, id: string, payload: Record<string, unknown>, headers: Record<string, string> = {}) =>
  app.inject({ method: 'PATCH', url: `/projects/${id}`, headers: { ...authHeader(user), ...headers }, payload })

async function eventsOf (app: FastifyInstance, where: { stream?: string, type: string }) {
  return await app.prisma.event.findMany({ where, orderBy: { seq: 'asc' } })
}

async function setup (t: Test, conflicts?: Omit<ErpConflictsOptions, 'prisma'>) {
  const built = await build(t, { realtime: conflicts ? { conflicts } : {} })
  const company = await createCompany(built.app, ['admin', 'manager', 'member'])
  return { ...built, company, estimator: company.as('manager'), siteManager: company.as('member') }
}

t.test('two users editing different fields from the same base are both applied; the second answer says merged', async t => {
  const { app, estimator, siteManager } = await setup(t)
  const project = await createProject(app, estimator)
  const budget = await patch(app, estimator, project.id, { baseVersion: 1, budgetMinor: 5000 })
  t.equal(budget.statusCode, 200)
  t.match(budget.json(), { merged: false, project: { budgetMinor: 5000, name: 'Site A', version: 2 } })
  const rename = await patch(app, siteManager, project.id, { baseVersion: 1, name: 'Site A (north)' })
  t.equal(rename.statusCode, 200)
  t.match(rename.json(), { merged: true, project: { budgetMinor: 5000, name: 'Site A (north)', version: 3 } })
  const updates = await eventsOf(app, { type: 'project:updated' })
  t.same(updates.map(e => (e.data as { changed: string[] }).changed), [['budgetMinor'], ['name']])
  t.same(updates.map(e => (e.data as { merged: boolean }).merged), [false, true])
})

t.test('a field sent with its base value is not an edit: the newer value someone else wrote is kept', async t => {
  // Clients often send the whole form; only the fields that differ from the base are theirs.
  const { app, estimator, siteManager } = await setup(t)
  const project = await createProject(app, estimator)
  await patch(app, estimator, project.id, { baseVersion: 1, budgetMinor: 5000 })
  const res = await patch(app, siteManager, project.id, { baseVersion: 1, name: 'Renamed', budgetMinor: 1000, description: '' })
  t.equal(res.statusCode, 200)
  t.match(res.json(), { merged: true, project: { name: 'Renamed', budgetMinor: 5000, version: 3 } })
})

t.test('a stale edit that makes the change someone else already made answers the current row without a new version', async t => {
  const { app, estimator, siteManager } = await setup(t)
  const project = await createProject(app, estimator)
  await patch(app, estimator, project.id, { baseVersion: 1, name: 'Same' })
  const res = await patch(app, siteManager, project.id, { baseVersion: 1, name: 'Same' })
  t.equal(res.statusCode, 200)
  t.match(res.json(), { merged: true, project: { name: 'Same', version: 2 } })
  t.equal((await eventsOf(app, { type: 'project:updated' })).length, 1)
})

t.test('reject (default): overlapping edits answer 409 with current, yours, base and fields, and conflict:detected reaches the editor', async t => {
  const { app, url, estimator, siteManager } = await setup(t)
  const project = await createProject(app, estimator)
  const socket = await connect(t, url, siteManager.token)
  const other = await connect(t, url, estimator.token)
  let leaked = false
  other.on('conflict:detected', () => { leaked = true })
  await patch(app, estimator, project.id, { baseVersion: 1, name: 'Web name', budgetMinor: 7000 })
  const detected = nextEvent(socket, 'conflict:detected')
  const res = await patch(app, siteManager, project.id, { baseVersion: 1, name: 'Mobile name', description: 'from the site' })
  t.equal(res.statusCode, 409)
  const body = res.json()
  t.equal(body.error.code, 'CONFLICT')
  t.type(body.error.message, 'string')
  t.same(body.fields, ['name'])
  t.same(body.yours, { name: 'Mobile name', description: 'from the site' })
  t.match(body.current, { id: project.id, name: 'Web name', budgetMinor: 7000, version: 2 })
  t.match(body.base, { id: project.id, name: 'Site A', budgetMinor: 1000, version: 1 })
  const event = await detected
  t.match(event, {
    stream: `user:${siteManager.id}`,
    type: 'conflict:detected',
    actor: { userId: siteManager.id },
    data: { entity: 'project', entityId: project.id, fields: ['name'], resolution: 'rejected' }
  })
  // Nothing of the rejected request was applied, not even its non-overlapping field.
  const row = await app.prisma.project.findUniqueOrThrow({ where: { id: project.id } })
  t.match(row, { name: 'Web name', description: '', version: 2 })
  t.equal(leaked, false, 'the other user is not told about someone else\'s conflict')
})

t.test('If-Match works like baseVersion', async t => {
  const { app, estimator, siteManager } = await setup(t)
  const project = await createProject(app, estimator)
  const first = await patch(app, estimator, project.id, { name: 'One' }, { 'if-match': '"1"' })
  t.equal(first.statusCode, 200)
  t.match(first.json(), { merged: false, project: { version: 2 } })
  const stale = await patch(app, siteManager, project.id, { name: 'Two' }, { 'if-match': 'W/"1"' })
  t.equal(stale.statusCode, 409)
  t.equal(stale.json().error.code, 'CONFLICT')
  const merged = await patch(app, siteManager, project.id, { budgetMinor: 3 }, { 'if-match': '1' })
  t.match(merged.json(), { merged: true, project: { name: 'One', budgetMinor: 3, version: 3 } })
  const bad = await patch(app, siteManager, project.id, { name: 'Three' }, { 'if-match': '*' })
  t.equal(bad.statusCode, 400)
  t.equal(bad.json().error.code, 'VALIDATION_FAILED')
  const missing = await patch(app, siteManager, project.id, { name: 'Three' })
  t.equal(missing.statusCode, 400)
})

t.test('regression: a stale If-Match was ignored when the body also sent a (current) baseVersion, and If-Match "0" passed', async t => {
  const { app, estimator } = await setup(t)
  const project = await createProject(app, estimator)
  await patch(app, estimator, project.id, { baseVersion: 1, name: 'One' })
  const disagree = await patch(app, estimator, project.id, { baseVersion: 2, name: 'Two' }, { 'if-match': '"1"' })
  t.equal(disagree.statusCode, 400, 'they disagree: refused, not applied as current')
  t.match(disagree.json().error, { code: 'VALIDATION_FAILED', message: /disagree/ })
  const zero = await patch(app, estimator, project.id, { name: 'Two' }, { 'if-match': '"0"' })
  t.equal(zero.statusCode, 400, 'version 0 does not exist, as for baseVersion: 0')
  const agree = await patch(app, estimator, project.id, { baseVersion: 2, name: 'Two' }, { 'if-match': '"2"' })
  t.equal(agree.statusCode, 200, 'both sent and equal is fine')
  t.equal((await app.prisma.project.findUnique({ where: { id: project.id } }))?.name, 'Two')
})

t.test('a baseVersion newer than the row is refused, and another company\'s project answers 404', async t => {
  const { app, estimator } = await setup(t)
  const project = await createProject(app, estimator)
  const ahead = await patch(app, estimator, project.id, { baseVersion: 9, name: 'x' })
  t.equal(ahead.statusCode, 400)
  t.match(ahead.json().error, { code: 'VALIDATION_FAILED', message: /newer/ })
  const stranger = (await createCompany(app, ['manager'])).as('manager')
  const foreign = await patch(app, stranger, project.id, { baseVersion: 1, name: 'x' })
  t.equal(foreign.statusCode, 404)
  t.equal(foreign.json().error.code, 'NOT_FOUND')
})

t.test('when the base revision is no longer kept, every differing field conflicts', async t => {
  const { app, estimator, siteManager } = await setup(t)
  const project = await createProject(app, estimator)
  await patch(app, estimator, project.id, { baseVersion: 1, budgetMinor: 2 })
  await app.prisma.revision.deleteMany({ where: { entityId: project.id, version: 1 } })
  const res = await patch(app, siteManager, project.id, { baseVersion: 1, budgetMinor: 3, name: 'Site A' })
  t.equal(res.statusCode, 409)
  t.same(res.json().fields, ['budgetMinor'])
  t.equal(res.json().base, null)
})

t.test('a revision recorded under another company is never used as a merge base', async t => {
  const { app, estimator, siteManager } = await setup(t)
  const other = await createCompany(app, ['admin'])
  const project = await createProject(app, estimator)
  await patch(app, estimator, project.id, { baseVersion: 1, budgetMinor: 2 })
  // A base row with this id and version, but of another company (ids are per entity only).
  await app.prisma.revision.updateMany({ where: { entityId: project.id, version: 1 }, data: { companyId: other.id, data: { name: 'Site A', budgetMinor: 3 } } })
  const res = await patch(app, siteManager, project.id, { baseVersion: 1, budgetMinor: 3, name: 'Site A' })
  t.equal(res.statusCode, 409, 'treated as a missing base: every differing field conflicts')
  t.equal(res.json().base, null, 'and nothing of the other company\'s row is shown')
})

t.test('last-write-wins: the overlapping edit is applied and the editor is told', async t => {
  const { app, url, estimator, siteManager } = await setup(t, { strategies: { project: 'last-write-wins' } })
  const project = await createProject(app, estimator)
  const socket = await connect(t, url, siteManager.token)
  await patch(app, estimator, project.id, { baseVersion: 1, name: 'Web name', budgetMinor: 7000 })
  const detected = nextEvent(socket, 'conflict:detected')
  const res = await patch(app, siteManager, project.id, { baseVersion: 1, name: 'Mobile name' })
  t.equal(res.statusCode, 200)
  t.match(res.json(), { merged: true, project: { name: 'Mobile name', budgetMinor: 7000, version: 3 } })
  t.match(await detected, { data: { entity: 'project', entityId: project.id, fields: ['name'], resolution: 'last-write-wins' } })
  // The conflict is recorded in the same transaction as the change, after its company event.
  const updated = await eventsOf(app, { type: 'project:updated' })
  t.equal(updated.length, 2)
})

t.test('a custom resolver decides: its result is applied, and null rejects with 409', async t => {
  const seen: ConflictContext[] = []
  const resolver = (context: ConflictContext) => {
    seen.push(context)
    if (context.fields.includes('budgetMinor')) return null
    return { ...context.merged, name: `${String(context.current.name)} / ${String(context.yours.name)}`, version: 99, id: 'hijack' }
  }
  const { app, url, estimator, siteManager } = await setup(t, { strategies: { project: resolver } })
  const project = await createProject(app, estimator)
  const socket = await connect(t, url, siteManager.token)
  await patch(app, estimator, project.id, { baseVersion: 1, name: 'Web', budgetMinor: 10 })

  const detected = nextEvent(socket, 'conflict:detected')
  const res = await patch(app, siteManager, project.id, { baseVersion: 1, name: 'Mobile', description: 'd' })
  t.equal(res.statusCode, 200)
  t.match(res.json(), { merged: true, project: { id: project.id, name: 'Web / Mobile', description: 'd', budgetMinor: 10, version: 3 } })
  t.match(await detected, { data: { fields: ['name'], resolution: 'custom' } })
  t.match(seen[0], {
    entity: 'project',
    id: project.id,
    fields: ['name'],
    base: { name: 'Site A', version: 1 },
    current: { name: 'Web', version: 2 },
    yours: { name: 'Mobile', description: 'd' },
    merged: { name: 'Mobile', description: 'd' }
  })

  const refused = await patch(app, siteManager, project.id, { baseVersion: 1, budgetMinor: 11 })
  t.equal(refused.statusCode, 409)
  t.same(refused.json().fields, ['budgetMinor'])
  t.equal((await app.prisma.project.findUniqueOrThrow({ where: { id: project.id } })).budgetMinor, 10)
})

// Regression (stock review): a resolver that keeps the current row ("server wins") still bumped
// the version with no change, recorded a zero stock movement and published stock:updated, which
// made every other client's baseVersion stale. The editor is still told its edit was dropped.
t.test('a custom resolver that keeps the current row writes nothing: no new version, no movement, no change event; the editor gets conflict:detected', async t => {
  const { app, prisma, estimator } = await setup(t, { strategies: { project: (context) => context.current, stockItem: (context) => context.current } })
  const project = await createProject(app, estimator)
  await patch(app, estimator, project.id, { baseVersion: 1, name: 'Web' })
  const kept = await patch(app, estimator, project.id, { baseVersion: 1, name: 'Mobile' })
  t.equal(kept.statusCode, 200)
  t.match(kept.json(), { project: { name: 'Web', version: 2 } })
  t.equal((await prisma.project.findUniqueOrThrow({ where: { id: project.id } })).version, 2)
  t.equal((await eventsOf(app, { type: 'project:updated' })).length, 1, 'only the first edit published')

  const created = await app.inject({ method: 'POST', url: '/stock/items', headers: authHeader(estimator), payload: { sku: 'SW-1', name: 'x', quantity: 10 } })
  const item = created.json().item as { id: string }
  t.equal((await app.inject({ method: 'POST', url: `/stock/items/${item.id}/adjustments`, headers: authHeader(estimator), payload: { delta: -3, reason: 'sold' } })).statusCode, 201)
  const before = (await eventsOf(app, { type: 'stock:updated' })).length
  const counted = await app.inject({ method: 'PUT', url: `/stock/items/${item.id}/count`, headers: authHeader(estimator), payload: { quantity: 12, baseVersion: 1 } })
  t.equal(counted.statusCode, 200)
  t.match(counted.json(), { item: { quantity: 7, version: 2 } })
  t.equal((await prisma.stockItem.findUniqueOrThrow({ where: { id: item.id } })).version, 2)
  t.equal(await prisma.stockMovement.count({ where: { itemId: item.id, delta: 0 } }), 0, 'no zero movement')
  t.equal((await eventsOf(app, { type: 'stock:updated' })).length, before, 'no stock:updated')
  const detected = await eventsOf(app, { stream: `user:${estimator.id}`, type: 'conflict:detected' })
  t.match(detected.map(e => e.data), [{ entity: 'project', fields: ['name'], resolution: 'custom' }, { entity: 'stockItem', fields: ['quantity'], resolution: 'custom' }])
})

t.test('a writer that bypasses update() between its read and its write makes it re-read and retry, never overwrite', async t => {
  // The resolver runs between the read and the conditional write: a direct SQL bump there is
  // exactly the interleaving of a concurrent stock adjustment.
  let bumps = 0
  let app!: FastifyInstance
  const resolver = async (context: ConflictContext) => {
    if (bumps < 1 || context.yours.name === 'forever') {
      bumps++
      await app.prisma.$executeRaw`UPDATE projects SET version = version + 1, description = ${`bump ${bumps}`} WHERE id = ${context.id}`
    }
    return context.merged
  }
  const built = await setup(t, { strategies: { project: resolver } })
  app = built.app
  const project = await createProject(app, built.estimator)
  await patch(app, built.estimator, project.id, { baseVersion: 1, name: 'Web' })
  const res = await patch(app, built.siteManager, project.id, { baseVersion: 1, name: 'Mobile' })
  t.equal(res.statusCode, 200)
  t.match(res.json(), { merged: true, project: { name: 'Mobile', description: 'bump 1', version: 4 } })

  const starved = await patch(app, built.siteManager, project.id, { baseVersion: 1, name: 'forever' })
  t.equal(starved.statusCode, 503)
  t.equal(starved.json().error.code, 'SERVICE_UNAVAILABLE')
  t.equal((await app.prisma.project.findUniqueOrThrow({ where: { id: project.id } })).name, 'Mobile')
})

t.test('50 concurrent edits from the same base: one applies as-is, the rest merge or get 409, and rows plus events account for all', async t => {
  const { app, estimator, siteManager } = await setup(t)
  const project = await createProject(app, estimator)
  const fieldOf = (i: number) => (['name', 'description', 'budgetMinor'] as const)[i % 3]!
  const valueOf = (i: number) => (fieldOf(i) === 'budgetMinor' ? 10_000 + i : `edit ${i}`)
  const responses = await Promise.all(Array.from({ length: 50 }, (_, i) =>
    patch(app, siteManager, project.id, { baseVersion: 1, [fieldOf(i)]: valueOf(i) }).then(res => ({ i, res }))))

  const ok = responses.filter(r => r.res.statusCode === 200)
  const conflicts = responses.filter(r => r.res.statusCode === 409)
  t.equal(ok.length + conflicts.length, 50, 'every request answered 200 or 409')
  t.equal(ok.filter(r => r.res.json().merged === false).length, 1, 'exactly one applied as-is')
  // Later edits of a field someone already changed since base 1 overlap; at most one per field applies.
  t.same(new Set(ok.map(r => fieldOf(r.i))).size, ok.length, 'no field was written twice from the same base')
  t.same(ok.map(r => r.res.json().project.version).sort((a, b) => a - b), Array.from({ length: ok.length }, (_, k) => k + 2))

  const row = await app.prisma.project.findUniqueOrThrow({ where: { id: project.id } })
  t.equal(row.version, 1 + ok.length, 'one version per applied request')
  for (const { i } of ok) t.equal((row as Record<string, unknown>)[fieldOf(i)], valueOf(i), `applied edit ${i} is in the row`)
  for (const { i, res } of conflicts) {
    t.same(res.json().fields, [fieldOf(i)])
    t.not((row as Record<string, unknown>)[fieldOf(i)], valueOf(i))
  }

  const updated = await eventsOf(app, { type: 'project:updated' })
  t.equal(updated.length, ok.length, 'one project:updated per applied request')
  const rejected = await eventsOf(app, { stream: `user:${siteManager.id}`, type: 'conflict:detected' })
  t.equal(rejected.length, conflicts.length, 'one conflict:detected per 409')
  t.ok(rejected.every(e => (e.data as { resolution: string }).resolution === 'rejected'))
})

t.test('50 concurrent edits with last-write-wins: every one applies, each on its own version', async t => {
  const { app, siteManager, estimator } = await setup(t, { strategies: { project: 'last-write-wins' } })
  const project = await createProject(app, estimator)
  const responses = await Promise.all(Array.from({ length: 50 }, (_, i) =>
    patch(app, siteManager, project.id, { baseVersion: 1, name: `edit ${i}` })))
  t.ok(responses.every(r => r.statusCode === 200))
  t.equal(responses.filter(r => r.json().merged === false).length, 1)
  const versions = responses.map(r => r.json().project.version as number).sort((a, b) => a - b)
  t.same(versions, Array.from({ length: 50 }, (_, k) => k + 2))
  const last = responses.find(r => r.json().project.version === 51)!
  const row = await app.prisma.project.findUniqueOrThrow({ where: { id: project.id } })
  t.equal(row.name, last.json().project.name, 'the last write won')
  t.equal((await eventsOf(app, { type: 'project:updated' })).length, 50)
  t.equal((await eventsOf(app, { type: 'conflict:detected' })).length, 49)
})

t.test('old revisions are pruned by the background job', async t => {
  const { app, estimator } = await setup(t, { revisionTtlSeconds: 60, pruneIntervalMs: 20 })
  const project = await createProject(app, estimator)
  await patch(app, estimator, project.id, { baseVersion: 1, name: 'v2' })
  await app.prisma.revision.updateMany({ where: { entityId: project.id }, data: { createdAt: new Date(Date.now() - 3600_000) } })
  const deadline = Date.now() + 5000
  while (await app.prisma.revision.count({ where: { entityId: project.id, version: 1 } }) > 0 && Date.now() < deadline) {
    await new Promise(resolve => setTimeout(resolve, 20))
  }
  t.same((await app.prisma.revision.findMany({ where: { entityId: project.id } })).map(r => r.version), [2], 'the latest revision stays')
})

t.test('regression: pruning by age alone removed the merge base of a row left unchanged for revisionTtlSeconds, and the next stale edit got a false 409', async t => {
  const { app, estimator, siteManager } = await setup(t, { revisionTtlSeconds: 60, pruneIntervalMs: 0 })
  const project = await createProject(app, estimator)
  await app.prisma.revision.updateMany({ where: { entityId: project.id }, data: { createdAt: new Date(Date.now() - 3600_000) } })
  t.equal(await app.conflicts.prune(), 0, 'the only (latest) revision of the row is kept')
  t.equal((await patch(app, estimator, project.id, { baseVersion: 1, name: 'renamed' })).statusCode, 200)
  const res = await patch(app, siteManager, project.id, { baseVersion: 1, budgetMinor: 5 })
  t.equal(res.statusCode, 200, 'a stale edit of another field merges')
  t.equal(res.json().project.name, 'renamed')
  t.equal(await app.conflicts.prune(), 0, 'v1 stays until v2 has existed for revisionTtlSeconds')
})

t.test('prune() deletes in bounded batches', async t => {
  const { app, estimator } = await setup(t, { pruneIntervalMs: 0, revisionTtlSeconds: 60, pruneBatchSize: 2 })
  for (let i = 0; i < 5; i++) {
    const project = await createProject(app, estimator, { name: `p${i}` })
    await patch(app, estimator, project.id, { baseVersion: 1, name: `p${i} v2` })
  }
  await app.prisma.revision.updateMany({ data: { createdAt: new Date(Date.now() - 3600_000) } })
  t.equal(await app.conflicts.prune(), 5)
  t.equal(await app.conflicts.prune(), 0)
})

t.test('invalid options stop the registration with a message naming the option', async t => {
  const db = await testDatabase(t)
  await t.rejects(
    buildApp({ config: testConfig(), db, realtime: { conflicts: { strategies: { project: 'first-write-wins' as never } } } }),
    /erp-conflicts: invalid option strategies\.project/
  )
  await t.rejects(
    buildApp({ config: testConfig(), db, realtime: { conflicts: { revisionTtlSeconds: 1 } } }),
    /erp-conflicts: invalid option revisionTtlSeconds/
  )
  await t.rejects(
    buildApp({ config: testConfig(), db, realtime: { conflicts: { strategies: { project: 'first-write-wins' as never } } } }),
    { message: "erp-conflicts: invalid option strategies.project: must be 'reject', 'last-write-wins' or a resolver function" },
    'the message lists what a strategy may be'
  )
})

// Regression (HTTP review): a misspelled strategies key (`stockitem`) registered without a word and
// left stock items on 'reject'. With `entities` (this app passes its three), it fails registration.
t.test('a strategies key that is not one of the entities fails the registration; so does an update naming another entity', async t => {
  const db = await testDatabase(t)
  await t.rejects(
    buildApp({ config: testConfig(), db, realtime: { conflicts: { strategies: { stockitem: 'last-write-wins' } } } }),
    { message: 'erp-conflicts: invalid option strategies.stockitem: is not one of the entities (project, expense, stockItem); did you mean stockItem?' }
  )
  const { app } = await build(t, { db, realtime: { conflicts: { strategies: { stockItem: 'last-write-wins' } } } })
  const unknown = { entity: 'projekt', id: 'x', companyId: 'c', userId: 'u', baseVersion: 1, changes: {}, read: async () => null, write: async () => ({ count: 0 }), applied: async () => {}, respond: () => null }
  await t.rejects(app.conflicts.update(unknown), { name: 'TypeError', message: 'erp-conflicts: "projekt" is not one of the entities (project, expense, stockItem)' })
  t.throws(() => app.conflicts.snapshotStatement('projekt', { id: 'x', companyId: 'c', version: 1 }), TypeError)
})

/** An app whose error log lines are kept, with the given conflict strategies. */
async function setupLogged (t: Test, strategies: ErpConflictsOptions['strategies']) {
  const db = await testDatabase(t)
  const logged: Array<{ msg: string, err?: { code?: string, message?: string } }> = []
  const app = await buildApp({
    config: testConfig(),
    db,
    logger: { level: 'error', stream: { write: (line: string) => { logged.push(JSON.parse(line)) } } },
    realtime: { conflicts: { strategies }, eventLog: { headIntervalMs: 0, pruneIntervalMs: 0 } }
  })
  t.teardown(() => app.close())
  const company = await createCompany(app, ['manager', 'member'])
  return { app, logged, estimator: company.as('manager'), siteManager: company.as('member') }
}

// Regression: a custom resolver's fields were written as returned, past the route's own rules (a
// negative budget, a field the route does not let anyone change, a negative count of an item that
// does not allow negative stock).
t.test('a custom resolver that returns fields the route refuses writes nothing and answers 500 CONFLICT_RESOLVER_INVALID (logged)', async t => {
  const returned: Array<Record<string, unknown>> = [{ budgetMinor: -5 }, { name: 'ok', archivedBy: 'x' }, { name: '' }]
  const { app, logged, estimator, siteManager } = await setupLogged(t, { project: () => returned.shift() ?? null })
  const project = await createProject(app, estimator)
  await patch(app, estimator, project.id, { baseVersion: 1, name: 'Web' })
  for (const reason of [/budgetMinor: Too small/, /Unrecognized key: "archivedBy"/, /name: /]) {
    const res = await patch(app, siteManager, project.id, { baseVersion: 1, name: 'Mobile' })
    t.equal(res.statusCode, 500)
    t.same(res.json(), { error: { code: 'INTERNAL', message: 'Internal server error' } })
    const last = logged.at(-1)
    t.equal(last?.err?.code, 'CONFLICT_RESOLVER_INVALID', 'the log names the resolver')
    t.match(last?.err?.message, /^The project conflict resolver returned fields the update refuses: /)
    t.match(last?.err?.message, reason)
  }
  const row = await app.prisma.project.findUniqueOrThrow({ where: { id: project.id } })
  t.match(row, { name: 'Web', budgetMinor: 1000, version: 2 }, 'nothing written')
  t.equal((await eventsOf(app, { type: 'project:updated' })).length, 1, 'and nothing published but the first edit')
  t.equal((await eventsOf(app, { type: 'conflict:detected' })).length, 0)
})

t.test('a custom stock resolver may not make a count negative on an item without allowNegative, nor write another field', async t => {
  const returned: Array<Record<string, unknown> | 'whole row'> = [{ quantity: -3 }, { quantity: 4, allowNegative: true }, 'whole row']
  const { app, logged, estimator, siteManager } = await setupLogged(t, {
    stockItem: (context) => {
      const next = returned.shift()
      // The whole current row with a new quantity: its unchanged fields are no edits, so it passes.
      return next === 'whole row' ? { ...context.current, quantity: 4 } : next ?? null
    }
  })
  const created = await app.inject({ method: 'POST', url: '/stock/items', headers: authHeader(estimator), payload: { sku: 'CEM-25', name: 'Cement 25kg', quantity: 10 } })
  const item = created.json().item as { id: string }
  const count = (user: TestUser, quantity: number) =>
    app.inject({ method: 'PUT', url: `/stock/items/${item.id}/count`, headers: authHeader(user), payload: { quantity, baseVersion: 1 } })
  t.equal((await count(estimator, 8)).statusCode, 200)
  for (const reason of [/quantity must not be negative/, /Unrecognized key: "allowNegative"/]) {
    const res = await count(siteManager, 9)
    t.equal(res.statusCode, 500)
    t.equal(logged.at(-1)?.err?.code, 'CONFLICT_RESOLVER_INVALID')
    t.match(logged.at(-1)?.err?.message, reason)
  }
  t.match(await app.prisma.stockItem.findUniqueOrThrow({ where: { id: item.id } }), { quantity: 8, allowNegative: false, version: 2 }, 'nothing written')
  const resolved = await count(siteManager, 9)
  t.equal(resolved.statusCode, 200, 'a resolver result within the rules is applied (a whole row whose other fields are unchanged)')
  t.match(resolved.json(), { merged: true, item: { quantity: 4, version: 3 } })
})

// Regression: the per-row queue and advisory lock were keyed by entity and id only, so a member
// of another company who knew the id could queue requests (each answered 404 in the end) in front
// of the row's own company's updates and stall them.
t.test('updates of a row queue only behind its own company\'s: another company\'s request for the id answers 404 at once', async t => {
  let release!: () => void
  const held = new Promise<void>(resolve => { release = resolve })
  let entered!: () => void
  const resolving = new Promise<void>(resolve => { entered = resolve })
  const { app, estimator, siteManager } = await setup(t, { strategies: { project: async (context) => { entered(); await held; return context.merged } } })
  const outsider = (await createCompany(app, ['admin'])).as('admin')
  const project = await createProject(app, estimator)
  await patch(app, estimator, project.id, { baseVersion: 1, name: 'Web' })
  // The company's own conflicting edit holds the row's queue and lock inside its resolver.
  const own = patch(app, siteManager, project.id, { baseVersion: 1, name: 'Mobile' })
  await resolving
  const answer = await Promise.race([
    patch(app, outsider, project.id, { baseVersion: 1, name: 'Stolen' }),
    new Promise<'queued'>(resolve => setTimeout(() => resolve('queued'), 5000).unref())
  ])
  t.not(answer, 'queued', 'not queued behind the other company\'s update')
  if (answer !== 'queued') t.equal(answer.statusCode, 404)
  release()
  t.equal((await own).statusCode, 200)
  t.match(await app.prisma.project.findUniqueOrThrow({ where: { id: project.id } }), { name: 'Mobile', version: 3 })
})

// Regression (HTTP review): an app's entity with a BigInt column failed every update with a 500
// (JSON.stringify refuses a bigint), and one with a Decimal column counted a number sent with the
// stored value (12.5 against the Decimal's "12.5") as an edit, so a stale form always conflicted.
t.test('entities with BigInt and Decimal columns: updates work, and a number sent with the stored value is not an edit', async t => {
  const { Prisma } = await import('../src/generated/prisma/client.ts')
  const { app } = await build(t, {
    realtime: { conflicts: { entities: ['project', 'expense', 'stockItem', 'ledger'] } },
    routes: async (fastify) => {
      fastify.patch('/ledgers/:id', { preHandler: fastify.authenticate }, async (request) => {
        const { id } = request.params as { id: string }
        const { baseVersion, ...changes } = request.body as { baseVersion: number } & Record<string, unknown>
        const { companyId, userId } = request.user
        // A project read as a ledger row with a BigInt and a Decimal column beside its own.
        const read = async (tx: Parameters<Parameters<typeof fastify.eventLog.transaction>[0]>[0]) => {
          const row = await tx.project.findFirst({ where: { id, companyId } })
          return row && { ...row, sequence: 9007199254740993n, rate: new Prisma.Decimal('12.5') }
        }
        return await fastify.conflicts.update({
          entity: 'ledger', id, companyId, userId, baseVersion, changes, read,
          write: (tx, data, version) => tx.project.updateMany({ where: { id, companyId, version }, data: { name: data.name as string | undefined, version: { increment: 1 } } }),
          applied: async () => {},
          respond: (row, merged) => ({ version: row.version, name: row.name, sequence: String(row.sequence), merged })
        })
      })
    }
  })
  const user = (await createCompany(app, ['manager'])).as('manager')
  const project = await createProject(app, user)
  const h = authHeader(user)
  const current = await app.inject({ method: 'PATCH', url: `/ledgers/${project.id}`, headers: h, payload: { baseVersion: 1, name: 'v2' } })
  t.equal(current.statusCode, 200, 'a row with a bigint updates')
  t.same(current.json(), { version: 2, name: 'v2', sequence: '9007199254740993', merged: false })
  // Stale (base 2, now 3 after another rename), the form sent whole: rate and sequence as numbers with
  // their stored values are not this request's edits, so nothing overlaps.
  await app.inject({ method: 'PATCH', url: `/ledgers/${project.id}`, headers: h, payload: { baseVersion: 2, name: 'v3' } })
  const stale = await app.inject({ method: 'PATCH', url: `/ledgers/${project.id}`, headers: h, payload: { baseVersion: 2, name: 'v3', rate: 12.5 } })
  t.equal(stale.statusCode, 200, 'no conflict on the Decimal column')
  t.match(stale.json(), { version: 3, name: 'v3', merged: true })
  // The stored BigInt is beyond a double: the number nearest to it is another value, an edit.
  const near = await app.inject({ method: 'PATCH', url: `/ledgers/${project.id}`, headers: h, payload: { baseVersion: 2, sequence: 9007199254740992 } })
  t.match(near.json(), { version: 4, merged: true }, '9007199254740992 is not 9007199254740993')
  const changed = await app.inject({ method: 'PATCH', url: `/ledgers/${project.id}`, headers: h, payload: { baseVersion: 2, rate: 13 } })
  t.match(changed.json(), { version: 5, merged: true }, 'another value for it is an edit: written, a new version')
})
