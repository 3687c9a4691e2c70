import net from 'node:net'
import t from 'tap'
import { databaseUnreachable } from '../plugins/support.ts'
import { openDatabase, queryTimeoutError } from '../src/db/index.ts'
import { migrate } from '../src/db/migrate.ts'
import { authHeader, build, createCompany, emptyTestDatabase } from './helpers.ts'

const UNAVAILABLE = { code: 'SERVICE_UNAVAILABLE', message: 'Database unreachable; try again' }

/**
 * A TCP proxy in front of PostgreSQL that can stop forwarding on demand: connections stay open
 * and nothing is answered (a frozen server or a black-holed network). `thaw` forwards what was
 * held and resumes.
 */
async function freezableProxy (t: { teardown (fn: () => unknown): void }, target: URL) {
  let frozen = false
  const held: Array<() => void> = []
  const sockets = new Set<net.Socket>()
  const server = net.createServer(client => {
    const upstream = net.connect(Number(target.port || 5432), target.hostname)
    for (const socket of [client, upstream]) {
      sockets.add(socket)
      socket.on('error', () => {})
      socket.on('close', () => sockets.delete(socket))
    }
    const pipe = (from: net.Socket, to: net.Socket) => from.on('data', data => {
      const forward = () => { if (!to.destroyed) to.write(data) }
      if (frozen) held.push(forward)
      else forward()
    })
    pipe(client, upstream)
    pipe(upstream, client)
    client.on('close', () => upstream.destroy())
    upstream.on('close', () => client.destroy())
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => {
    for (const socket of sockets) socket.destroy()
    server.close()
  })
  const url = new URL(target.toString())
  url.host = `127.0.0.1:${(server.address() as net.AddressInfo).port}`
  return {
    url: url.toString(),
    freeze () { frozen = true },
    thaw () {
      frozen = false
      for (const forward of held.splice(0)) forward()
    }
  }
}

/** The request's outcome, or 'pending' when it has not answered after `ms`. */
async function within<T> (ms: number, promise: Promise<T>): Promise<T | 'pending'> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([promise, new Promise<'pending'>(resolve => { timer = setTimeout(() => resolve('pending'), ms) })])
  } finally {
    clearTimeout(timer)
  }
}

t.test('the query bound\'s error is an outage (503) to databaseUnreachable', async t => {
  const err = queryTimeoutError(30_000)
  t.equal(err.code, 'ETIMEDOUT')
  t.ok(databaseUnreachable(err))
})

// Regression: the pg.Pool had no connection timeout and no query bound, so while PostgreSQL hung
// (connections open, no replies) GET /projects and everything else waited for the whole hang.
t.test('PostgreSQL hangs: GET /projects answers 503 within the bounds (it waited without limit), and works again after', async t => {
  const base = await emptyTestDatabase(t)
  await base.withSession(sql => migrate(sql))
  const proxy = await freezableProxy(t, new URL(base.url))
  const db = await openDatabase({ url: proxy.url, poolSize: 3, connectTimeoutMs: 1000, queryTimeoutMs: 1500 })
  // Registered after the proxy's teardown, so it runs first (tap runs teardowns in reverse).
  t.teardown(() => within(2000, db.close()))
  const { app } = await build(t, { db })
  const company = await createCompany(app, ['admin'])
  const headers = authHeader(company.as('admin'))
  t.equal((await app.inject({ method: 'GET', url: '/projects', headers })).statusCode, 200, 'before the hang')

  proxy.freeze()
  try {
    // More requests than pool slots: the ones on pooled connections hit the query bound, the
    // others the connect bound (new connections get no reply to their startup either).
    const started = Date.now()
    const answers = await within(6000, Promise.all(Array.from({ length: 5 }, async () => {
      const response = await app.inject({ method: 'GET', url: '/projects', headers })
      return { status: response.statusCode, body: response.json() as unknown, ms: Date.now() - started }
    })))
    if (answers === 'pending') {
      t.fail('GET /projects still pending after 6000 ms while PostgreSQL hangs (query bound 1500 ms, connect bound 1000 ms)')
    } else {
      for (const answer of answers) {
        t.equal(answer.status, 503, `answered 503 in ${answer.ms} ms`)
        t.same(answer.body, { error: UNAVAILABLE })
        t.ok(answer.ms < 4500, 'within the bounds (with margin)')
      }
    }
    // A second wave, once the hung connections were dropped: the connect bound answers it.
    const second = await within(6000, app.inject({ method: 'GET', url: '/projects', headers }))
    t.equal(second === 'pending' ? 'pending' : second.statusCode, 503, 'a later request during the hang answers 503 too')
  } finally {
    proxy.thaw()
  }

  const after = await within(6000, app.inject({ method: 'GET', url: '/projects', headers }))
  t.equal(after === 'pending' ? 'pending' : after.statusCode, 200, 'GET /projects works again once PostgreSQL answers')
})

t.test('withSession (migrations) is not cut short by the query bound', async t => {
  const base = await emptyTestDatabase(t)
  const db = await openDatabase({ url: base.url, poolSize: 1, queryTimeoutMs: 200 })
  t.teardown(() => db.close())
  const rows = await db.withSession(sql => sql.query('SELECT pg_sleep(0.5), 1 AS ok'))
  t.equal(rows[0]?.ok, 1, 'a 500 ms statement on a session ran to completion under a 200 ms bound')
  const err = await db.prisma.$queryRawUnsafe('SELECT pg_sleep(0.5)').then(() => undefined, (e: unknown) => e)
  // Prisma's PrismaClientKnownRequestError, code ETIMEDOUT (the adapter's SocketTimeout).
  t.match(err, { name: 'PrismaClientKnownRequestError', code: 'ETIMEDOUT', message: /PostgreSQL sent no reply within 200 ms/ }, 'the same statement through Prisma is bounded')
  t.ok(databaseUnreachable(err), 'and an outage to databaseUnreachable (503)')
  t.same(await db.prisma.$queryRawUnsafe('SELECT 1 AS ok'), [{ ok: 1 }], 'the pool replaced the closed connection')
})
