import type { IncomingMessage } from 'node:http'
import t from 'tap'
import { buildApp } from '../src/app.ts'
import { openDatabase } from '../src/db/index.ts'
import { HEALTH_PROBE_REUSE_MS } from '../plugins/health/index.ts'
import { build, connect, createCompany, sleep, testConfig, testDatabase, uniqueName, waitFor, TEST_REDIS_URL } from './helpers.ts'

t.test('GET /health/websocket reports the node in the contract shape', async t => {
  const { app, url } = await build(t, { realtime: { socket: { nodeId: 'node-under-test' } } })
  const company = await createCompany(app, ['admin', 'member'])

  const idle = await app.inject({ method: 'GET', url: '/health/websocket' })
  t.equal(idle.statusCode, 200)
  const body = idle.json()
  t.match(body, {
    status: 'ok',
    nodeId: 'node-under-test',
    uptimeSeconds: Number,
    connections: 0,
    adapter: { type: 'memory', status: 'up' },
    database: { status: 'up' },
    eventLog: { backend: 'postgresql' }
  })
  t.ok(body.uptimeSeconds >= 0)
  t.equal(body.nodes, 1, 'the memory adapter is one node')
  t.type(body.database.latencyMs, 'number')
  t.same(Object.keys(body).sort(), ['adapter', 'connections', 'database', 'eventLog', 'nodeId', 'nodes', 'status', 'uptimeSeconds'])

  // connections counts the sockets connected to this node.
  const first = await connect(t, url, company.as('admin').token)
  await connect(t, url, company.as('admin').token)
  await connect(t, url, company.as('member').token)
  t.equal((await app.inject({ method: 'GET', url: '/health/websocket' })).json().connections, 3)
  first.disconnect()
  await waitFor(async () => (await app.inject({ method: 'GET', url: '/health/websocket' })).json().connections === 2, 3000, 'connections to drop')
  t.equal((await app.websocketHealth()).connections, 2, 'the decorator reports the same')

  const live = await app.inject({ method: 'GET', url: '/health/live' })
  t.equal(live.statusCode, 200)
  t.same(live.json(), { status: 'ok' })
  const ready = await app.inject({ method: 'GET', url: '/health/ready' })
  t.equal(ready.statusCode, 200)
  t.match(ready.json(), { status: 'ok', database: { status: 'up' } })

  // Health needs no token.
  t.equal((await fetch(`${url}/health/websocket`)).status, 200, 'reachable over real HTTP without a token')
})

t.test('a node whose database is closed answers 503 with status down', async t => {
  const db = await testDatabase(t)
  const { app } = await build(t, { db })
  t.equal((await app.inject({ method: 'GET', url: '/health/websocket' })).statusCode, 200)
  await db.close()
  // The last probe's result is reused for HEALTH_PROBE_REUSE_MS, never longer.
  await sleep(HEALTH_PROBE_REUSE_MS + 50)

  const res = await app.inject({ method: 'GET', url: '/health/websocket' })
  t.equal(res.statusCode, 503)
  t.match(res.json(), { status: 'down', database: { status: 'down' }, adapter: { type: 'memory', status: 'up' } })
  t.notOk('latencyMs' in res.json().database)
  const ready = await app.inject({ method: 'GET', url: '/health/ready' })
  t.equal(ready.statusCode, 503)
  t.match(ready.json(), { status: 'down', database: { status: 'down' } })
  const live = await app.inject({ method: 'GET', url: '/health/live' })
  t.equal(live.statusCode, 200, 'the process is alive even when it cannot serve')
})

t.test('a node whose PostgreSQL is unreachable answers 503', async t => {
  // Nothing listens on port 1: connections are refused at once.
  const db = await openDatabase({ url: 'postgresql://postgres@127.0.0.1:1/none', poolSize: 1 })
  t.teardown(() => db.close())
  const app = await buildApp({ config: testConfig(), db, realtime: { eventLog: { headIntervalMs: 0, pruneIntervalMs: 0 } } })
  t.teardown(() => app.close())
  await app.ready()
  const res = await app.inject({ method: 'GET', url: '/health/websocket' })
  t.equal(res.statusCode, 503)
  t.match(res.json(), { status: 'down', database: { status: 'down' }, eventLog: { backend: 'postgresql' } })
  t.equal((await app.inject({ method: 'GET', url: '/health/ready' })).statusCode, 503)
})

t.test('a database probe slower than databaseTimeoutMs counts as down', async t => {
  const db = await testDatabase(t, { poolSize: 1 })
  const { app } = await build(t, { db, realtime: { health: { databaseTimeoutMs: 100 } } })
  // Hold the only pool connection, so the probe has to wait for it.
  const held = db.withSession(async (sql) => { await sql.query('SELECT pg_sleep(1)') })
  const res = await app.inject({ method: 'GET', url: '/health/websocket' })
  t.equal(res.statusCode, 503)
  t.match(res.json(), { status: 'down', database: { status: 'down' } })
  await held
  t.equal((await app.inject({ method: 'GET', url: '/health/websocket' })).statusCode, 200, 'up again once the connection is free')
})

t.test('probe fan-out: concurrent health requests share one database probe and one node count, reused for HEALTH_PROBE_REUSE_MS only', async t => {
  const db = await testDatabase(t, { poolSize: 2 })
  const prisma = db.prisma as unknown as { $queryRaw: (...args: unknown[]) => unknown }
  // The 320 requests below reach the server over a few hundred ms (320 new connections; over
  // 1 s from a cold HTTP client or on a loaded machine), while the node count settles at once
  // and the SELECT 1 within ms: a request arriving more than HEALTH_PROBE_REUSE_MS after the
  // first one's probe settled started a second probe. So the probes they start are held until
  // all 320 have arrived: each request then meets the one probe in flight.
  let hold: Promise<void> | undefined
  let selects = 0
  const queryRaw = prisma.$queryRaw.bind(prisma)
  prisma.$queryRaw = (...args: unknown[]) => {
    if (String((args[0] as string[] | undefined)?.[0] ?? '').includes('SELECT 1')) {
      selects++
      if (hold) return hold.then(() => queryRaw(...args))
    }
    return queryRaw(...args)
  }
  // A probe held that long must not count as a slow database.
  const { app, url } = await build(t, { db, realtime: { health: { databaseTimeoutMs: 60_000 } } })
  let counts = 0
  const serverCount = app.erpSocket.serverCount
  app.erpSocket.serverCount = () => {
    counts++
    return hold ? hold.then(() => serverCount()) : serverCount()
  }
  await sleep(HEALTH_PROBE_REUSE_MS + 50)
  selects = 0

  const requests = 320
  let arrived = 0
  let allArrived!: () => void
  hold = new Promise<void>(resolve => { allArrived = resolve })
  // Counted as it reaches the server; its handler asks for the probes in that turn or just after,
  // while the released probe is still in flight or its result fresh.
  const onRequest = (request: IncomingMessage) => {
    if (request.url?.startsWith('/health/') && ++arrived === requests) allArrived()
  }
  app.server.on('request', onRequest)
  const statuses = await Promise.all([
    ...Array.from({ length: 300 }, () => fetch(`${url}/health/websocket`).then(r => r.status)),
    ...Array.from({ length: 20 }, () => fetch(`${url}/health/ready`).then(r => r.status))
  ])
  app.server.off('request', onRequest)
  hold = undefined
  t.same([...new Set(statuses)], [200], 'every probe answers 200 on a pool of 2')
  t.equal(selects, 1, 'one SELECT 1 for 320 concurrent requests')
  t.equal(counts, 1, 'one node count for 300 concurrent requests')

  // Reuse after a probe settled, one request at a time: the fan-out's own 320 answers can take
  // longer than HEALTH_PROBE_REUSE_MS to go out on a loaded machine, so a request after them is
  // not "right after" its probe.
  await sleep(HEALTH_PROBE_REUSE_MS + 50)
  await app.inject({ method: 'GET', url: '/health/websocket' })
  t.equal(selects, 2, 'the fan-out\'s result is not reused once older than HEALTH_PROBE_REUSE_MS')
  t.equal(counts, 2)
  const again = await app.inject({ method: 'GET', url: '/health/websocket' })
  t.match(again.json(), { status: 'ok', database: { status: 'up' } })
  t.equal(selects, 2, 'a request right after reuses the result')
  t.equal(counts, 2)
  await sleep(HEALTH_PROBE_REUSE_MS + 50)
  await app.inject({ method: 'GET', url: '/health/websocket' })
  t.equal(selects, 3, 'no result older than HEALTH_PROBE_REUSE_MS is reused')
  t.equal(counts, 3)
})

t.test('embedded PGlite reports backend pglite', async t => {
  const { app, url } = await build(t, { embedded: true })
  const company = await createCompany(app, ['admin'])
  await connect(t, url, company.as('admin').token)
  const res = await app.inject({ method: 'GET', url: '/health/websocket' })
  t.equal(res.statusCode, 200)
  t.match(res.json(), { status: 'ok', connections: 1, adapter: { type: 'memory', status: 'up' }, database: { status: 'up' }, eventLog: { backend: 'pglite' } })
  t.equal((await app.inject({ method: 'GET', url: '/health/ready' })).statusCode, 200)
})

t.test('the Redis adapter is reported, and a Redis outage degrades the node without taking it down', async t => {
  const up = await build(t, { realtime: { socket: { redis: TEST_REDIS_URL, redisPrefix: uniqueName('health') } } })
  await waitFor(() => up.app.erpSocket.adapterStatus() === 'up', 5000, 'redis adapter to connect')
  const ok = await up.app.inject({ method: 'GET', url: '/health/websocket' })
  t.equal(ok.statusCode, 200)
  t.match(ok.json(), { status: 'ok', adapter: { type: 'redis', status: 'up' }, nodes: 1 })

  // Nothing listens on port 1; no retries, so the clients stay down.
  const down = await build(t, {
    realtime: { socket: { redis: 'redis://127.0.0.1:1', redisOptions: { retryStrategy: () => null, lazyConnect: false } } }
  })
  await waitFor(() => down.app.erpSocket.adapterStatus() === 'down', 5000, 'redis adapter to be down')
  const degraded = await down.app.inject({ method: 'GET', url: '/health/websocket' })
  t.equal(degraded.statusCode, 200, 'degraded still serves (single node works without Redis)')
  t.match(degraded.json(), { status: 'degraded', adapter: { type: 'redis', status: 'down' }, database: { status: 'up' } })
})

t.test('erp-health options are validated at registration', async t => {
  const db = await testDatabase(t)
  for (const [what, health] of [
    ['a bad prefix', { prefix: 'no-slash' }],
    ['a zero timeout', { databaseTimeoutMs: 0 }],
    ['an unknown backend', { eventLogBackend: 'mysql' }]
  ] as const) {
    const app = await buildApp({ config: testConfig(), db, realtime: { health: health as never, eventLog: { headIntervalMs: 0, pruneIntervalMs: 0 } } }).catch(err => err as Error)
    t.type(app, Error, what)
    t.match((app as Error).message, /erp-health: invalid option/, what)
  }
  const custom = await build(t, { db, realtime: { health: { prefix: '/_status' } } })
  t.equal((await custom.app.inject({ method: 'GET', url: '/_status/websocket' })).statusCode, 200, 'a custom prefix serves the routes')
})
