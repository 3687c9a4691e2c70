import pg from 'pg'
import t from 'tap'
import type { FastifyInstance } from 'fastify'
import type { Expense } from '../src/generated/prisma/client.ts'
import { authHeader, build, connect, createCompany, nextEvent, record, sleep, testDatabase, type TestLike } from './helpers.ts'
import { companyStream } from '../plugins/events.ts'

// DELETE /projects/:id: `expenses.projectId` is ON DELETE SET NULL, so the route detaches the
// project's expenses itself, in the delete's transaction: each an update (version + 1, revision
// snapshot), listed with its new version in the one `project:deleted` event.

/**
 * An expense update as an ERP backend would route it (the app has no expense PATCH of its own):
 * `fastify.conflicts.update` with the expense's default strategy ('reject').
 */
async function expenseUpdateRoute (app: FastifyInstance) {
  app.addHook('preHandler', app.authenticate)
  app.patch('/test/expenses/:id', async (request) => {
    const { id } = request.params as { id: string }
    const { baseVersion, ...changes } = request.body as { baseVersion: number } & Record<string, unknown>
    const { companyId, userId } = request.user
    return await app.conflicts.update({
      entity: 'expense',
      id,
      companyId,
      userId,
      baseVersion,
      changes,
      read: (tx) => tx.expense.findFirst({ where: { id, companyId } }),
      write: (tx, data, version) => tx.expense.updateMany({ where: { id, companyId, version }, data: { ...data, version: { increment: 1 } } }),
      applied: async () => {},
      respond: (expense: Expense, merged) => ({ expense, merged })
    })
  })
}

async function setup (t: TestLike, embedded: boolean) {
  const { app, url, prisma } = await build(t, { embedded, routes: expenseUpdateRoute })
  const company = await createCompany(app, ['manager', 'member'])
  const other = await createCompany(app, ['manager'])
  const h = authHeader(company.as('manager'))
  const hOther = authHeader(other.as('manager'))
  const project = async (headers: Record<string, string>, name: string) =>
    (await app.inject({ method: 'POST', url: '/projects', headers, payload: { name } })).json().project as { id: string }
  const expense = async (headers: Record<string, string>, description: string, projectId?: string) =>
    (await app.inject({ method: 'POST', url: '/expenses', headers, payload: { amountMinor: 100, currency: 'EUR', description, projectId } })).json().expense as Expense
  return { app, url, prisma, company, other, h, hOther, project, expense }
}

for (const embedded of [false, true]) {
  const on = embedded ? 'PGlite' : 'PostgreSQL'

  t.test(`${on}: deleting a project detaches its expenses as versioned updates, listed in the one project:deleted event`, async t => {
    const { app, url, prisma, company, other, h, hOther, project, expense } = await setup(t, embedded)
    const doomed = await project(h, 'doomed')
    const kept = await project(h, 'kept')
    const empty = await project(h, 'empty')
    const otherProject = await project(hOther, 'other company')
    const first = await expense(h, 'taxi', doomed.id)
    const second = await expense(h, 'hotel', doomed.id)
    const onKept = await expense(h, 'train', kept.id)
    const loose = await expense(h, 'lunch')
    const otherExpense = await expense(hOther, 'flight', otherProject.id)
    t.same([first, second].map(e => [e.projectId, e.version]), [[doomed.id, 1], [doomed.id, 1]])
    const untouched = await prisma.expense.findMany({ where: { id: { in: [onKept.id, loose.id, otherExpense.id] } }, orderBy: { id: 'asc' } })

    await app.inject({ method: 'PATCH', url: `/projects/${doomed.id}`, headers: h, payload: { baseVersion: 1, name: 'doomed, renamed' } })
    t.equal(await prisma.revision.count({ where: { entity: 'project', entityId: doomed.id } }), 2, 'the project has two snapshots')
    const stream = companyStream(company.id)
    const headBefore = (await app.eventLog.heads([stream])).get(stream)!
    const socket = await connect(t, url, company.as('manager').token)
    const seen = record(socket)
    const received = nextEvent(socket, 'project:deleted')

    // Someone no longer a member is refused (the membership is checked in the transaction) and changes nothing.
    const member = company.as('member')
    await prisma.membership.delete({ where: { userId_companyId: { userId: member.id, companyId: company.id } } })
    const refused = await app.inject({ method: 'DELETE', url: `/projects/${doomed.id}`, headers: authHeader(member) })
    t.equal(refused.statusCode, 403)
    t.equal(refused.json().error.code, 'AUTH_NOT_A_MEMBER')
    t.match(await prisma.expense.findUnique({ where: { id: first.id } }), { projectId: doomed.id, version: 1 }, 'a refused delete detaches nothing')

    // Another company's project is a 404 and changes nothing.

    const foreign = await app.inject({ method: 'DELETE', url: `/projects/${otherProject.id}`, headers: h })
    t.equal(foreign.statusCode, 404)
    t.equal(foreign.json().error.code, 'NOT_FOUND')
    t.equal(await prisma.project.count({ where: { id: otherProject.id } }), 1)

    const del = await app.inject({ method: 'DELETE', url: `/projects/${doomed.id}`, headers: h })
    t.equal(del.statusCode, 204)
    t.equal(await prisma.project.count({ where: { id: doomed.id } }), 0)
    // Regression (HTTP review): the pruning job keeps each row's latest snapshot, so a deleted
    // project's stayed, with its data, for good.
    t.equal(await prisma.revision.count({ where: { entity: 'project', entityId: doomed.id } }), 0, 'its snapshots went with it')
    t.equal(await prisma.revision.count({ where: { entity: 'project', entityId: kept.id } }), 1, 'another project\'s stay')

    const detached = await prisma.expense.findMany({ where: { id: { in: [first.id, second.id] } } })
    const byId = new Map(detached.map(e => [e.id, e]))
    for (const before of [first, second]) {
      const after = byId.get(before.id)!
      t.equal(after.projectId, null, `${before.description}: projectId is null`)
      t.equal(after.version, 2, `${before.description}: version bumped`)
      t.ok(after.updatedAt.getTime() >= new Date(before.updatedAt).getTime(), `${before.description}: updatedAt moved on`)
      const revision = await prisma.revision.findUnique({ where: { entity_entityId_version: { entity: 'expense', entityId: before.id, version: 2 } } })
      t.ok(revision, `${before.description}: revision 2 recorded`)
      t.match(revision!.data, { id: before.id, projectId: null, version: 2, description: before.description })
    }
    t.same(await prisma.expense.findMany({ where: { id: { in: [onKept.id, loose.id, otherExpense.id] } }, orderBy: { id: 'asc' } }), untouched,
      'expenses of another project, of none and of another company are untouched')

    const envelope = await received
    t.match(envelope, { stream, seq: headBefore + 1, type: 'project:deleted', companyId: company.id, actor: { userId: company.as('manager').id } })
    t.same(envelope.data, { projectId: doomed.id, detachedExpenses: [{ id: first.id, version: 2 }, { id: second.id, version: 2 }], detachedExpenseCount: 2 })
    const logged = await app.eventLog.read(stream, headBefore, 10)
    t.same(logged.map(e => [e.type, e.data]), [['project:deleted', envelope.data]], 'one event, recorded with the same data')

    // A project without expenses: the list is there, empty.
    const emptyEvent = nextEvent(socket, 'project:deleted')
    t.equal((await app.inject({ method: 'DELETE', url: `/projects/${empty.id}`, headers: h })).statusCode, 204)
    t.same((await emptyEvent).data, { projectId: empty.id, detachedExpenses: [], detachedExpenseCount: 0 })

    // Deleted twice: 404, nothing detached or recorded.
    t.equal((await app.inject({ method: 'DELETE', url: `/projects/${doomed.id}`, headers: h })).statusCode, 404)
    await sleep(100)
    t.same(seen.filter(e => e.event.startsWith('project:') || e.event.startsWith('expense:')).map(e => e.event), ['project:deleted', 'project:deleted'],
      'no other domain event reached the company')
    t.equal((await app.eventLog.heads([stream])).get(stream), headBefore + 2)
    const otherStream = companyStream(other.id)
    t.same((await app.eventLog.read(otherStream, 0, 10)).map(e => e.type), ['project:created', 'expense:submitted'], 'the other company recorded nothing more')
  })

  t.test(`${on}: an expense update based on the pre-delete version is stale: merged without undoing the detach, or 409`, async t => {
    const { app, prisma, h, project, expense } = await setup(t, embedded)
    const doomed = await project(h, 'doomed')
    const target = await project(h, 'target')
    const edited = await expense(h, 'taxi', doomed.id)
    const moved = await expense(h, 'hotel', doomed.id)
    t.equal((await app.inject({ method: 'DELETE', url: `/projects/${doomed.id}`, headers: h })).statusCode, 204)
    const patch = (id: string, payload: Record<string, unknown>) => app.inject({ method: 'PATCH', url: `/test/expenses/${id}`, headers: h, payload })

    // The client's form as it was at version 1, with a new description: the detach (projectId)
    // and the edit (description) do not overlap, so it is merged, and projectId stays null.
    const merged = await patch(edited.id, { baseVersion: 1, projectId: doomed.id, description: 'taxi to the airport' })
    t.equal(merged.statusCode, 200)
    t.match(merged.json(), { merged: true, expense: { id: edited.id, projectId: null, description: 'taxi to the airport', version: 3 } })
    t.match(await prisma.expense.findUnique({ where: { id: edited.id } }), { projectId: null, description: 'taxi to the airport', version: 3 })

    // Moving it to another project from version 1 overlaps the detach: 409 (the expense strategy is 'reject').
    const conflict = await patch(moved.id, { baseVersion: 1, projectId: target.id })
    t.equal(conflict.statusCode, 409)
    t.match(conflict.json(), {
      error: { code: 'CONFLICT' },
      fields: ['projectId'],
      base: { projectId: doomed.id, version: 1 },
      current: { projectId: null, version: 2 },
      yours: { projectId: target.id }
    })
    t.match(await prisma.expense.findUnique({ where: { id: moved.id } }), { projectId: null, version: 2 }, 'nothing applied')

    // The detach's revision is the base of later merges: from version 2 (as the event announced),
    // after an approval made version 3, a new description merges instead of conflicting.
    const approved = await app.inject({ method: 'POST', url: `/expenses/${moved.id}/approve`, headers: h })
    t.equal(approved.statusCode, 200)
    t.equal(approved.json().expense.version, 3)
    const fromDetached = await patch(moved.id, { baseVersion: 2, description: 'hotel, two nights' })
    t.equal(fromDetached.statusCode, 200)
    t.match(fromDetached.json(), { merged: true, expense: { projectId: null, status: 'approved', description: 'hotel, two nights', version: 4 } })
  })
}

t.test('regression: an expense created for a project while its delete ran failed with a foreign-key 500', async t => {
  const db = await testDatabase(t)
  const { app } = await build(t, { db })
  const company = await createCompany(app, ['manager'])
  const h = authHeader(company.as('manager'))
  const doomed = (await app.inject({ method: 'POST', url: '/projects', headers: h, payload: { name: 'doomed' } })).json().project as { id: string }
  // Another session does what the delete does: locks the project row, then deletes it.
  const deleter = new pg.Client({ connectionString: db.url })
  await deleter.connect()
  t.teardown(() => deleter.end())
  await deleter.query('BEGIN')
  await deleter.query('SELECT 1 FROM projects WHERE id = $1 FOR UPDATE', [doomed.id])
  const creating = app.inject({ method: 'POST', url: '/expenses', headers: h, payload: { amountMinor: 100, currency: 'EUR', description: 'taxi', projectId: doomed.id } })
  await sleep(200)
  await deleter.query('DELETE FROM projects WHERE id = $1', [doomed.id])
  await deleter.query('COMMIT')
  const answer = await creating
  t.equal(answer.statusCode, 404, 'the project is gone: 404, as for any missing project')
  t.equal(answer.json().error.code, 'NOT_FOUND')
  t.equal(await app.prisma.expense.count({ where: { companyId: company.id } }), 0)
})

t.test('a project with more expenses than one snapshot statement takes (1,000) is deleted with every one detached and snapshotted', async t => {
  const { app } = await build(t)
  const company = await createCompany(app, ['manager'])
  const manager = company.as('manager')
  const h = authHeader(manager)
  const big = (await app.inject({ method: 'POST', url: '/projects', headers: h, payload: { name: 'big' } })).json().project as { id: string }
  await app.prisma.expense.createMany({
    data: Array.from({ length: 1200 }, (_, i) => ({ companyId: company.id, submitterId: manager.id, projectId: big.id, amountMinor: i + 1, currency: 'EUR', description: `e${i}` }))
  })
  t.equal((await app.inject({ method: 'DELETE', url: `/projects/${big.id}`, headers: h })).statusCode, 204)
  t.equal(await app.prisma.expense.count({ where: { companyId: company.id, projectId: null, version: 2 } }), 1200)
  t.equal(await app.prisma.revision.count({ where: { entity: 'expense', companyId: company.id, version: 2 } }), 1200)
  const [deleted] = (await app.eventLog.read(companyStream(company.id), 0, 10)).filter(e => e.type === 'project:deleted')
  const data = deleted!.data as { detachedExpenses: unknown[], detachedExpenseCount: number }
  t.equal(data.detachedExpenses.length, 1000, 'the event lists at most 1,000')
  t.equal(data.detachedExpenseCount, 1200, 'and says how many there were')
})
