import t from 'tap'
import { authHeader, build, createCompany } from './helpers.ts'

// Regression (replay review): the retention jobs computed their cutoff from this node's clock,
// while `createdAt` is stamped by the database's: a node whose clock ran an hour ahead pruned
// events and merge bases an hour early, for every client.

/** Runs `fn` with this process's clock `aheadMs` ahead. */
async function withClockAhead<T> (aheadMs: number, fn: () => Promise<T>): Promise<T> {
  const realNow = Date.now
  Date.now = () => realNow() + aheadMs
  try {
    return await fn()
  } finally {
    Date.now = realNow
  }
}

t.test('a node whose clock runs ahead prunes no event before the database\'s clock says it is ttlSeconds old', async t => {
  const { app } = await build(t, { realtime: { eventLog: { ttlSeconds: 3600 } } })
  const company = await createCompany(app, ['admin'])
  const stream = `company:${company.id}` as const
  await app.eventLog.publish({ stream, type: 'project:deleted', companyId: company.id, actorId: null, data: { projectId: 'p' } })
  t.equal(await withClockAhead(2 * 3600_000, () => app.eventLog.prune()), 0, 'nothing pruned')
  t.equal((await app.eventLog.read(stream, 0, 10)).length, 1)
  // Once the database's clock agrees, it goes.
  await app.prisma.$executeRaw`UPDATE events SET "createdAt" = "createdAt" - interval '2 hours' WHERE stream = ${stream}`
  t.equal(await app.eventLog.prune(), 1)
})

t.test('a node whose clock runs ahead prunes no merge base before the database\'s clock says it is revisionTtlSeconds old', async t => {
  const { app, prisma } = await build(t, { realtime: { conflicts: { revisionTtlSeconds: 3600 } } })
  const admin = (await createCompany(app, ['admin'])).as('admin')
  const project = (await app.inject({ method: 'POST', url: '/projects', headers: authHeader(admin), payload: { name: 'A' } })).json().project
  await app.inject({ method: 'PATCH', url: `/projects/${project.id}`, headers: authHeader(admin), payload: { baseVersion: 1, name: 'B' } })
  t.equal(await withClockAhead(2 * 3600_000, () => app.conflicts.prune()), 0, 'nothing pruned')
  t.equal(await prisma.revision.count({ where: { entityId: project.id } }), 2)
  await prisma.$executeRaw`UPDATE revisions SET "createdAt" = "createdAt" - interval '2 hours' WHERE "entityId" = ${project.id}`
  t.equal(await app.conflicts.prune(), 1, 'the older base goes once both are old enough')
})
