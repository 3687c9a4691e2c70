import t from 'tap'
import { Prisma } from '../src/generated/prisma/client.ts'
import { authHeader, build, createCompany, testDatabase } from './helpers.ts'

// Regression (replay review): the retention jobs computed their cutoff from this node's clock,
// while `createdAt` is stamped by the database's: a node whose clock ran an hour ahead pruned
// events and merge bases an hour early, for every client. PostgreSQL only: PGlite runs in this
// process, on its clock.

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

// Regression (review of the fix above): a cutoff from the volatile clock_timestamp() cannot be an
// index bound, so every prune run scanned the whole events table.
for (const embedded of [false, true]) {
  const on = embedded ? 'PGlite' : 'PostgreSQL'
  t.test(`${on}: the retention jobs' cutoffs can use the createdAt indexes`, async t => {
    const db = await testDatabase(t, { embedded })
    const statements: Array<{ sql: string, text: string, values: unknown[] }> = []
    // The app's client, with its `$executeRaw` DELETEs of events and revisions recorded.
    const prisma = new Proxy(db.prisma, {
      get (target, prop) {
        const value = Reflect.get(target, prop, target) as unknown
        if (prop !== '$executeRaw') return typeof value === 'function' ? (value as (...a: unknown[]) => unknown).bind(target) : value
        return (strings: TemplateStringsArray, ...values: unknown[]) => {
          const query = Prisma.sql(strings, ...values)
          if (/^\s*DELETE FROM (events|revisions)/.test(query.sql)) statements.push({ sql: query.sql, text: query.text, values: query.values })
          return (value as (...a: unknown[]) => unknown).call(target, strings, ...values)
        }
      }
    })
    const { app } = await build(t, { db: { ...db, prisma } })
    await app.eventLog.prune()
    await app.conflicts.prune()
    const cutoffDeletes = statements.filter(query => query.sql.includes('"createdAt" <'))
    t.equal(cutoffDeletes.length, 2, 'the events\' and the revisions\' cutoff deletes')
    for (const query of cutoffDeletes) {
      const plan = await db.prisma.$transaction(async (tx) => {
        await tx.$executeRawUnsafe('SET LOCAL enable_seqscan = off')
        return await tx.$queryRawUnsafe<Array<{ 'QUERY PLAN': string }>>(`EXPLAIN ${query.text}`, ...query.values)
      })
      t.match(plan.map(row => row['QUERY PLAN']).join('\n'), /(Index (Only )?Scan using|Bitmap Index Scan on) "(events|revisions)_createdAt_idx"/, query.sql.trim().slice(0, 60))
    }
  })
}
