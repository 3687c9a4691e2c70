import t from 'tap'
import { build, connect, createCompany, dropRedisPrefix, nextEvent, record, sleep, TEST_REDIS_URL, testDatabase, uniqueName } from './helpers.ts'
import { sqlErrorOf } from '../plugins/support.ts'

t.test('regression: a malformed erp:events from another node ended the process (unhandled rejection in the adapter)', async t => {
  const prefix = uniqueName('relay')
  t.teardown(() => dropRedisPrefix(TEST_REDIS_URL, prefix))
  const db = await testDatabase(t)
  const realtime = { socket: { redis: TEST_REDIS_URL, redisPrefix: prefix } }
  const a = await build(t, { db, realtime })
  const b = await build(t, { db, realtime })
  const company = await createCompany(a.app, ['admin'])
  const socket = await connect(t, a.url, company.as('admin').token)
  const relay = b.app.io.serverSideEmit.bind(b.app.io) as (event: string, ...args: unknown[]) => boolean
  for (const payload of [null, [null], 'text', [{ stream: `company:${company.id}`, seq: 'one' }],
    [{ id: 'x', stream: `company:${company.id}`, seq: 5, type: 'disconnect', companyId: company.id, at: '', actor: { userId: null }, data: {} }],
    [{ id: 'x', stream: `company:${company.id}`, seq: 5, type: 'project:deleted', companyId: 'another', at: '', actor: { userId: null }, data: {} }]]) {
    relay('erp:events', payload)
  }
  await sleep(200)
  // Still alive, and the stream is not skipped ahead: the next real event arrives.
  const received = nextEvent(socket, 'project:deleted')
  await b.app.eventLog.publish({ stream: `company:${company.id}`, type: 'project:deleted', companyId: company.id, actorId: null, data: { projectId: 'p-1' } })
  t.match(await received, { seq: 1, data: { projectId: 'p-1' } })
})

t.test('regression: eventLog.publish inside eventLog.transaction deadlocked until the timeout, then committed an event for a rolled-back change', async t => {
  const { app } = await build(t)
  const company = await createCompany(app, ['admin'])
  const stream = `company:${company.id}` as const
  const event = { stream, type: 'project:deleted' as const, companyId: company.id, actorId: null, data: { projectId: 'p' } }
  const started = Date.now()
  await t.rejects(app.eventLog.transaction(async (_tx, publish) => {
    await publish(event)
    await app.eventLog.publish(event)
  }), /use the publish function the transaction passes to its callback/)
  await t.rejects(app.eventLog.transaction(async () => { await app.eventLog.transaction(async () => {}) }), /inside eventLog\.transaction/)
  t.ok(Date.now() - started < 5000, 'refused at once, not after transactionTimeoutMs')
  t.same(await app.eventLog.read(stream, 0, 10), [], 'nothing recorded: the outer transaction rolled back with the refusal')
})

t.test('regression: publish accepted a company stream of another company and reserved event names', async t => {
  const { app } = await build(t)
  const acme = await createCompany(app, ['admin'])
  const globex = await createCompany(app, ['admin'])
  const publish = (event: Record<string, unknown>) => app.eventLog.publish({ actorId: null, data: {}, ...event } as never)
  await t.rejects(publish({ stream: `company:${globex.id}`, type: 'project:deleted', companyId: acme.id }), /is not the stream of company/)
  for (const type of ['disconnect', 'auth:expired', 'sync:head', 'server:shutdown', '']) {
    await t.rejects(publish({ stream: `company:${acme.id}`, type, companyId: acme.id }), /cannot be an event type/, type)
  }
  await t.rejects(publish({ stream: 'tenant:1', type: 'project:deleted', companyId: acme.id }), /stream must be/)
  await t.rejects(publish({ stream: `company:${acme.id}`, type: 'project:deleted', companyId: acme.id, data: undefined }), /JSON value/)
  t.same(await app.eventLog.read(`company:${globex.id}`, 0, 10), [], 'nothing reached the other company')
  t.same(await app.eventLog.read(`company:${acme.id}`, 0, 10), [])
  const user = `user:${acme.as('admin').id}` as const
  await publish({ stream: user, type: 'notification:new', companyId: globex.id, data: { kind: 'k', message: 'm' } })
  t.equal((await app.eventLog.read(user, 0, 10)).length, 1, 'a user stream spans companies: any companyId')
})

// Regression (replay review): a callback that caught a failed statement left the transaction
// aborted; PostgreSQL turned its COMMIT into a ROLLBACK, which Prisma does not report, so
// transaction() resolved and emitted seq 1 that was never recorded. The next real event reused
// seq 1, and every node's sequencer, already past it, dropped it: no client ever got it.
for (const embedded of [false, true]) {
  t.test(`${embedded ? 'PGlite' : 'PostgreSQL'}: a transaction aborted by a statement whose error the callback caught rejects and emits nothing; the next event arrives`, async t => {
    const { app, url, prisma } = await build(t, { embedded })
    const company = await createCompany(app, ['admin'])
    const stream = `company:${company.id}` as const
    const socket = await connect(t, url, company.as('admin').token)
    const seen = record(socket)
    await t.rejects(app.eventLog.transaction(async (tx, publish) => {
      await publish({ stream, type: 'project:deleted', companyId: company.id, actorId: null, data: { projectId: 'phantom' } })
      // A duplicate key, caught as "already exists": the transaction is aborted all the same.
      await tx.$executeRaw`INSERT INTO companies (id, name) VALUES (${company.id}, 'duplicate')`.catch(() => {})
    }), { message: /a statement in this transaction failed and its error was caught/, cause: { message: /current transaction is aborted/ } })
    t.same(await app.eventLog.read(stream, 0, 10), [], 'nothing recorded')
    const received = nextEvent(socket, 'project:deleted')
    await app.eventLog.publish({ stream, type: 'project:deleted', companyId: company.id, actorId: null, data: { projectId: 'real' } })
    t.match(await received, { seq: 1, data: { projectId: 'real' } }, 'the real seq 1 arrives')
    await sleep(100)
    t.same(seen.filter(e => e.event === 'project:deleted').map(e => e.payload.data), [{ projectId: 'real' }], 'no phantom event')
    t.equal(await prisma.event.count({ where: { stream } }), 1)
  })
}

t.test('an event holding NUL or a lone surrogate is refused before anything is written (400 VALIDATION_FAILED over HTTP)', async t => {
  const { app } = await build(t)
  const company = await createCompany(app, ['admin'])
  const stream = `company:${company.id}` as const
  for (const data of [{ name: 'a\u0000b' }, { name: 'a\ud800' }, { ['k\u0000']: 1 }]) {
    await t.rejects(app.eventLog.publish({ stream, type: 'project:deleted', companyId: company.id, actorId: null, data: data as never }),
      { code: 'VALIDATION_FAILED', statusCode: 400 }, JSON.stringify(data))
  }
  await t.rejects(app.eventLog.transaction(async (_tx, publish) => {
    await publish({ stream, type: 'project:deleted', companyId: company.id, actorId: 'u\u0000', data: { projectId: 'p' } })
  }), { code: 'VALIDATION_FAILED' }, 'a NUL in a string field too')
  // A backslash followed by "u0000" is text, not a NUL.
  await app.eventLog.publish({ stream, type: 'project:deleted', companyId: company.id, actorId: null, data: { projectId: 'C:\\u0000' } })
  t.same((await app.eventLog.read(stream, 0, 10)).map(e => e.data), [{ projectId: 'C:\\u0000' }])
})

// Regression (publish overhead, bench replay): the SELECT 1 that ends every unguarded
// transaction cost a round trip (1.67x against 1.43x without it). On PostgreSQL the app's client
// refuses the COMMIT of an aborted transaction itself, so erp-offline-queue skips the statement
// there (`abortedCheck: 'driver'`).
t.test('openDatabase\'s PostgreSQL client refuses to commit an aborted transaction, rolls it back, and stays usable', async t => {
  const db = await testDatabase(t, { poolSize: 1 })
  const err = await db.prisma.$transaction(async (tx) => {
    await tx.$executeRaw`INSERT INTO companies (id, name) VALUES ('aborted', 'kept?')`
    await tx.$executeRaw`SELECT 1/0`.catch(() => {})
  }).catch((e: unknown) => e)
  t.match(sqlErrorOf(err), { code: '25P02', message: /current transaction is aborted/ })
  t.equal(await db.prisma.company.count({ where: { id: 'aborted' } }), 0, 'nothing committed, and the one connection answers')
  await db.prisma.$transaction(async (tx) => { await tx.$executeRaw`INSERT INTO companies (id, name) VALUES ('committed', 'yes')` })
  t.equal(await db.prisma.company.count({ where: { id: 'committed' } }), 1, 'a later transaction commits')
})
