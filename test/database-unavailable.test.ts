import pg from 'pg'
import t from 'tap'
import { companyStream } from '../plugins/events.ts'
import { databaseUnreachable } from '../plugins/support.ts'
import { openDatabase } from '../src/db/index.ts'
import { authHeader, build, connect, createCompany, request, TEST_PASSWORD, TEST_POSTGRES_URL, testDatabase, type TestLike } from './helpers.ts'

const UNAVAILABLE = { code: 'SERVICE_UNAVAILABLE', message: 'Database unreachable; try again' }

/**
 * Makes one test database unreachable for the app using it (new connections refused, its
 * sessions terminated) while the `test` database stays up; `restore` lets it connect again.
 */
async function cutOff (t: TestLike, url: string): Promise<{ restore (): Promise<void> }> {
  const name = new URL(url).pathname.slice(1)
  const admin = new pg.Client({ connectionString: TEST_POSTGRES_URL })
  await admin.connect()
  let cut = true
  const restore = async () => {
    if (!cut) return
    cut = false
    await admin.query(`ALTER DATABASE ${name} ALLOW_CONNECTIONS true`)
  }
  // Registered after the database's own teardown, so it runs before the drop (tap runs teardowns in reverse).
  t.teardown(async () => {
    await restore()
    await admin.end()
  })
  await admin.query(`ALTER DATABASE ${name} ALLOW_CONNECTIONS false`)
  await admin.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()', [name])
  return { restore }
}

t.test('database unreachable: HTTP routes answer 503 SERVICE_UNAVAILABLE, not 500 INTERNAL', async t => {
  const db = await testDatabase(t)
  const { app } = await build(t, { db })
  const company = await createCompany(app, ['admin'])
  const admin = company.as('admin')
  t.equal((await app.inject({ method: 'GET', url: '/projects', headers: authHeader(admin) })).statusCode, 200)

  const outage = await cutOff(t, db.url!)
  const answers = {
    'GET /projects': await app.inject({ method: 'GET', url: '/projects', headers: authHeader(admin) }),
    'POST /projects': await app.inject({ method: 'POST', url: '/projects', headers: authHeader(admin), payload: { name: 'during the outage' } }),
    'POST /auth/login': await app.inject({ method: 'POST', url: '/auth/login', payload: { email: admin.email, password: TEST_PASSWORD } })
  }
  for (const [route, res] of Object.entries(answers)) {
    t.equal(res.statusCode, 503, `${route} status`)
    t.same(res.json(), { error: UNAVAILABLE }, `${route} body`)
  }

  // Once the database is back, so are the routes.
  await outage.restore()
  t.equal((await app.inject({ method: 'GET', url: '/projects', headers: authHeader(admin) })).statusCode, 200)
})

t.test('database unreachable: socket acks answer SERVICE_UNAVAILABLE, not INTERNAL', async t => {
  const db = await testDatabase(t)
  const { app, url } = await build(t, { db })
  const company = await createCompany(app, ['admin'])
  const admin = company.as('admin')
  const socket = await connect(t, url, admin.token)
  const stream = companyStream(company.id)
  t.match(await request(socket, 'sync:resume', { streams: { [stream]: 0 } }), { ok: true })

  const outage = await cutOff(t, db.url!)
  t.same(await request(socket, 'sync:resume', { streams: { [stream]: 0 } }), { ok: false, error: UNAVAILABLE }, 'sync:resume')
  const token = app.erpAuth.sign({ sub: admin.id, companyId: company.id, role: 'admin' })
  t.same(await request(socket, 'auth:refresh', { token }), { ok: false, error: UNAVAILABLE }, 'auth:refresh')
  t.ok(socket.connected, 'the socket stays connected')

  await outage.restore()
  t.match(await request(socket, 'sync:resume', { streams: { [stream]: 0 } }), { ok: true })
  t.match(await request(socket, 'auth:refresh', { token }), { ok: true })
})

t.test('databaseUnreachable tells connection failures from query failures', async t => {
  const refused = await openDatabase({ url: 'postgresql://postgres@127.0.0.1:1/none', poolSize: 1 })
  t.teardown(() => refused.close())
  t.ok(databaseUnreachable(await refused.prisma.project.findMany().catch(e => e)), 'Prisma, connection refused')
  t.ok(databaseUnreachable(await refused.withSession(sql => sql.query('SELECT 1')).catch(e => e)), 'pg, connection refused')

  const db = await testDatabase(t)
  t.notOk(databaseUnreachable(await db.prisma.$queryRawUnsafe('SELEC 1').catch(e => e)), 'syntax error')
  t.notOk(databaseUnreachable(await db.prisma.$queryRawUnsafe('SELECT 1/0').catch(e => e)), 'division by zero')
  t.notOk(databaseUnreachable(await db.prisma.company.findUniqueOrThrow({ where: { id: 'none' } }).catch(e => e)), 'no row')
  t.notOk(databaseUnreachable(new Error('boom')), 'a plain error')
  t.notOk(databaseUnreachable(undefined), 'undefined')
})

// Regression (review): the guard re-check after a failed write ran after outages too, so a write
// that could not get a connection waited for one a second time before answering 503.
t.test('a guarded write that fails for want of a connection answers 503 without checking the guard again', async t => {
  const db = await testDatabase(t, { poolSize: 1, connectTimeoutMs: 300 })
  const { app } = await build(t, { db })
  const company = await createCompany(app, ['admin', 'member'])
  let guardQueries = 0
  const queryRaw = db.prisma.$queryRaw.bind(db.prisma) as (...args: unknown[]) => Promise<unknown>
  ;(db.prisma as unknown as { $queryRaw: unknown }).$queryRaw = (...args: unknown[]) => {
    if (/erp_require_member/.test(String((args[0] as { sql?: string } | undefined)?.sql ?? args[0]))) guardQueries++
    return queryRaw(...args)
  }
  let release!: () => void
  const held = db.withSession(() => new Promise<void>(resolve => { release = resolve }))
  const res = await app.inject({ method: 'POST', url: '/projects', headers: authHeader(company.as('member')), payload: { name: 'no connection' } })
  release()
  await held
  t.equal(res.statusCode, 503)
  t.equal(guardQueries, 1, 'only the write itself named the guard')
  // unreachable connects, recognised whatever their code: a unix socket path with no server, several addresses
  t.ok(databaseUnreachable(Object.assign(new Error('connect ENOENT /tmp/none/.s.PGSQL.5432'), { code: 'ENOENT', syscall: 'connect', address: '/tmp/none/.s.PGSQL.5432' })))
  t.notOk(databaseUnreachable(Object.assign(new Error('connect ENOENT /run/sidecar.sock'), { code: 'ENOENT', syscall: 'connect', address: '/run/sidecar.sock' })), "another service's socket is not the database")
  const looped = new AggregateError([])
  looped.errors.push(looped)
  t.notOk(databaseUnreachable(looped), 'an AggregateError that contains itself is not followed')
  t.ok(databaseUnreachable(new AggregateError([Object.assign(new Error('a'), { code: 'EADDRNOTAVAIL' }), Object.assign(new Error('b'), { code: 'ECONNREFUSED' })])))
  t.notOk(databaseUnreachable(Object.assign(new Error('no such file'), { code: 'ENOENT', syscall: 'open' })), 'a file error is not')
})
