import t from 'tap'
import { randomUUID } from 'node:crypto'
import { Prisma } from '../src/generated/prisma/client.ts'
import { openDatabase } from '../src/db/index.ts'
import { authHeader, build, connect, createCompany, nextEvent, record, sleep, testDatabase } from './helpers.ts'

/** Envelopes of the event log among what a socket recorded (presence is live state, not logged). */
const logged = (seen: Array<{ payload: any }>) => seen.filter(s => typeof s.payload?.seq === 'number')

const insertProject = (id: string, companyId: string, name: string) => Prisma.sql`
  INSERT INTO projects (id, "companyId", name, "updatedAt") VALUES (${id}, ${companyId}, ${name}, now())`

for (const embedded of [false, true]) {
  const on = embedded ? 'PGlite' : 'PostgreSQL'

  t.test(`${on}: commit runs the writes and records the event in one statement, then emits it`, async t => {
    const { app, url } = await build(t, { embedded })
    const company = await createCompany(app)
    const socket = await connect(t, url, company.as('member').token)
    const id = randomUUID()
    const stream = `company:${company.id}` as const
    const received = nextEvent(socket, 'project:deleted')
    const envelope = await app.eventLog.commit({
      writes: [insertProject(id, company.id, 'one statement'), app.conflicts.snapshotStatement('project', { id, companyId: company.id, version: 1 })],
      event: { stream, type: 'project:deleted', companyId: company.id, actorId: null, data: { projectId: id } }
    })
    t.match(envelope, { stream, seq: 1, type: 'project:deleted', data: { projectId: id } })
    t.same(await received, envelope, 'the live event is the recorded envelope')
    t.equal((await app.prisma.project.findUnique({ where: { id } }))?.name, 'one statement')
    t.equal(await app.prisma.revision.count({ where: { entityId: id, version: 1 } }), 1, 'every write ran')
    t.same(await app.eventLog.read(stream, 0, 10), [envelope])
  })

  t.test(`${on}: commit records nothing when its first write touches no row`, async t => {
    const { app, url } = await build(t, { embedded })
    const company = await createCompany(app)
    const socket = await connect(t, url, company.as('member').token)
    const seen = record(socket)
    const stream = `company:${company.id}` as const
    const result = await app.eventLog.commit({
      writes: [Prisma.sql`DELETE FROM projects WHERE id = ${randomUUID()}`],
      event: { stream, type: 'project:deleted', companyId: company.id, actorId: null, data: { projectId: 'none' } }
    })
    t.equal(result, null)
    await sleep(50)
    t.same(logged(seen), [], 'nothing emitted')
    t.equal(await app.prisma.event.count({ where: { stream } }), 0, 'nothing recorded')
    t.equal((await app.eventLog.heads([stream])).get(stream), 0, 'the stream head did not move')
  })

  t.test(`${on}: a commit whose statement fails writes, records and emits nothing`, async t => {
    const { app, url } = await build(t, { embedded })
    const company = await createCompany(app)
    const socket = await connect(t, url, company.as('member').token)
    const seen = record(socket)
    const id = randomUUID()
    const stream = `company:${company.id}` as const
    await app.prisma.project.create({ data: { id, companyId: company.id, name: 'taken' } })
    // The second write breaks the primary key: the whole statement rolls back, the first write too.
    const other = randomUUID()
    await t.rejects(app.eventLog.commit({
      writes: [insertProject(other, company.id, 'rolled back'), insertProject(id, company.id, 'duplicate')],
      event: { stream, type: 'project:deleted', companyId: company.id, actorId: null, data: { projectId: other } }
    }))
    await sleep(50)
    t.same(logged(seen), [])
    t.equal(await app.prisma.project.count({ where: { id: other } }), 0)
    t.equal(await app.prisma.event.count({ where: { stream } }), 0)
    t.equal((await app.eventLog.heads([stream])).get(stream), 0)
  })
}

t.test('commit without writes is refused before anything runs', async t => {
  const { app } = await build(t, { embedded: true })
  const company = await createCompany(app)
  const stream = `company:${company.id}` as const
  await t.rejects(app.eventLog.commit({ writes: [] as never, event: { stream, type: 'project:deleted', companyId: company.id, actorId: null, data: { projectId: 'x' } } }), /needs at least one write/)
  t.equal((await app.eventLog.heads([stream])).get(stream), 0)
})

t.test('concurrent commits and transactions on one stream get contiguous seqs, delivered in seq order', async t => {
  const { app, url } = await build(t)
  const company = await createCompany(app)
  const socket = await connect(t, url, company.as('member').token)
  const seen = record(socket)
  const stream = `company:${company.id}` as const
  const event = (projectId: string) => ({ stream, type: 'project:deleted' as const, companyId: company.id, actorId: null, data: { projectId } })
  await Promise.all(Array.from({ length: 40 }, (_, i) => {
    const id = randomUUID()
    return i % 2
      ? app.eventLog.commit({ writes: [insertProject(id, company.id, `c${i}`)], event: event(id) })
      : app.eventLog.transaction(async (tx, publish) => {
        await tx.project.create({ data: { id, companyId: company.id, name: `t${i}` } })
        await publish(event(id))
      })
  }))
  // Commits that finish out of seq order are delivered after a gap read from PostgreSQL: allow
  // it 10 s on a loaded machine (2 s before), the loop ends as soon as all forty are in.
  for (let i = 0; i < 500 && logged(seen).length < 40; i++) await sleep(20)
  const expected = Array.from({ length: 40 }, (_, i) => i + 1)
  t.same(logged(seen).map(s => s.payload.seq), expected, 'live delivery in seq order, none missing')
  t.same((await app.eventLog.read(stream, 0, 100)).map(e => e.seq), expected, 'the log is contiguous')
})

for (const embedded of [false, true]) {
  t.test(`${embedded ? 'PGlite' : 'PostgreSQL'}: POST /projects (one statement): the response, the stored row, the event and the revision agree`, async t => {
    const { app, url } = await build(t, { embedded })
    const company = await createCompany(app)
    const socket = await connect(t, url, company.as('member').token)
    const created = nextEvent(socket, 'project:created')
    const res = await app.inject({ method: 'POST', url: '/projects', headers: authHeader(company.as('admin')), payload: { name: '  Bridge  ', budgetMinor: 1200 } })
    t.equal(res.statusCode, 201)
    const { project } = res.json()
    t.match(project, { companyId: company.id, name: 'Bridge', description: '', status: 'active', budgetMinor: 1200, version: 1 })
    const stored = (await app.inject({ method: 'GET', url: `/projects/${project.id}`, headers: authHeader(company.as('member')) })).json().project
    t.same(stored, project, 'GET answers exactly what POST answered (same keys, order-insensitive values, timestamps)')
    t.same(Object.keys(project), Object.keys(stored), 'same field order as Prisma reads')
    const event = await created
    t.same(event.data.project, project)
    t.equal(event.actor.userId, company.as('admin').id)
    const revision = await app.prisma.revision.findUnique({ where: { entity_entityId_version: { entity: 'project', entityId: project.id, version: 1 } } })
    t.same(revision?.data, project, 'the snapshot is the row as created')
  })
}

t.test('a one-statement create stores UTC timestamps whatever the database session time zone', async t => {
  // A server or role configured with a non-UTC TimeZone must not shift the stored times.
  const migrated = await testDatabase(t)
  const db = await openDatabase({ url: `${migrated.url}?options=${encodeURIComponent('-c TimeZone=America/New_York')}` })
  t.teardown(() => db.close())
  t.same(await db.prisma.$queryRaw`SHOW TimeZone`, [{ TimeZone: 'America/New_York' }])
  const { app } = await build(t, { db })
  const company = await createCompany(app)
  const before = Date.now()
  const { project } = (await app.inject({ method: 'POST', url: '/projects', headers: authHeader(company.as('admin')), payload: { name: 'tz' } })).json()
  const row = await app.prisma.project.findUnique({ where: { id: project.id } })
  t.equal(row?.createdAt.toISOString(), project.createdAt)
  t.ok(Math.abs(row!.createdAt.getTime() - before) < 60_000, 'stored as the instant it was created')
})
