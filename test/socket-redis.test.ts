// erp-socket's Redis paths, in process: ownership of the clients, key prefix, password through
// the URL, start-up while Redis is down, a stalled Redis, and the options that go with them.
import t from 'tap'
import Fastify from 'fastify'
import { Redis } from 'ioredis'
import erpSocket, { guardCommands } from '../plugins/socket/index.ts'
import { companyStream } from '../plugins/events.ts'
import { ConfigError, loadConfig } from '../src/config.ts'
import { authHeader, build, connect, createCompany, record, request, sleep, testDatabase, uniqueName, waitFor, TEST_REDIS_URL } from './helpers.ts'
import { dedicatedRedis } from './cluster-helpers.ts'
import { HEALTH_PROBE_REUSE_MS } from '../plugins/health/index.ts'

const requestChannel = (prefix: string) => `${prefix}-request#/#`

/** Subscribers of a channel on a Redis, through a short-lived connection of the test. */
async function subscribers (url: string, channel: string): Promise<number> {
  const probe = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0 })
  probe.on('error', () => {})
  try {
    await probe.connect()
    const [, count] = await probe.pubsub('NUMSUB', channel) as [string, number]
    return Number(count)
  } finally {
    probe.disconnect()
  }
}

t.test('clients passed in stay the caller\'s: used with the prefix, not closed at close', async (t) => {
  const pubClient = new Redis(TEST_REDIS_URL)
  const subClient = pubClient.duplicate()
  t.teardown(() => { pubClient.disconnect(); subClient.disconnect() })
  const errors: Error[] = []
  pubClient.on('error', (err) => errors.push(err))
  const redisPrefix = uniqueName('erp_owned')
  const { app } = await build(t, { realtime: { socket: { redis: { pubClient, subClient }, redisPrefix } } })

  await waitFor(async () => (await app.websocketHealth()).adapter.status === 'up', 5000, 'adapter up')
  t.equal(app.erpSocket.adapterType, 'redis')
  t.equal(app.erpSocket.redisPrefix, redisPrefix)
  t.equal(await subscribers(TEST_REDIS_URL, requestChannel(redisPrefix)), 1, 'the adapter listens under the configured prefix')
  t.equal(await app.erpSocket.serverCount(), 1)

  await app.close()
  t.equal(pubClient.status, 'ready', 'publisher still open')
  t.equal(subClient.status, 'ready', 'subscriber still open')
  t.equal(await pubClient.ping(), 'PONG', 'publisher still usable')
  t.equal(await subscribers(TEST_REDIS_URL, requestChannel(redisPrefix)), 0, 'the adapter unsubscribed on close')
  t.equal(pubClient.listenerCount('error'), 1, 'only the caller\'s error listener is left')
  t.same(errors, [])
})

t.test('clients created from the URL are closed at close', async (t) => {
  const redisPrefix = uniqueName('erp_url')
  const { app } = await build(t, { realtime: { socket: { redis: TEST_REDIS_URL, redisPrefix } } })
  await waitFor(async () => (await subscribers(TEST_REDIS_URL, requestChannel(redisPrefix))) === 1, 5000, 'subscribed')
  await app.close()
  t.equal(await subscribers(TEST_REDIS_URL, requestChannel(redisPrefix)), 0, 'connection gone')
})

t.test('password through the URL; a wrong one leaves the node degraded, not crashed', async (t) => {
  const redis = await dedicatedRedis(t, { password: 's3cret/pw' })
  const db = await testDatabase(t)
  const good = await build(t, { db, realtime: { socket: { redis: redis.url, redisPrefix: uniqueName('erp_pw') } } })
  await waitFor(async () => (await good.app.websocketHealth()).status === 'ok', 5000, 'authenticated')
  t.match(await good.app.websocketHealth(), { status: 'ok', nodes: 1, adapter: { type: 'redis', status: 'up' } })

  const wrong = await build(t, {
    db,
    realtime: { socket: { redis: redis.url.replace('s3cret', 'wrong'), redisPrefix: uniqueName('erp_pw'), redisOptions: { retryStrategy: () => 200 } } }
  })
  const response = await wrong.app.inject('/health/websocket')
  t.equal(response.statusCode, 200)
  t.match(response.json(), { status: 'degraded', nodes: 1, adapter: { status: 'down' }, database: { status: 'up' } })
})

t.test('nodes that start while Redis is down join once it is up, and deliver across nodes', async (t) => {
  const redis = await dedicatedRedis(t, { start: false })
  const db = await testDatabase(t)
  const redisPrefix = uniqueName('erp_late')
  // Caller-owned clients that give up on commands at once: the adapter's subscribe is refused
  // while Redis is down and must be sent again when it comes up.
  const pubClient = new Redis(redis.url, { maxRetriesPerRequest: 0, retryStrategy: () => 100 })
  const subClient = new Redis(redis.url, { maxRetriesPerRequest: 0, retryStrategy: () => 100 })
  for (const client of [pubClient, subClient]) client.on('error', () => {})
  t.teardown(() => { pubClient.disconnect(); subClient.disconnect() })
  const a = await build(t, { db, realtime: { socket: { redis: redis.url, redisPrefix, redisOptions: { retryStrategy: () => 100 } } } })
  const b = await build(t, { db, realtime: { socket: { redis: { pubClient, subClient }, redisPrefix } } })

  for (const node of [a, b]) t.match(await node.app.websocketHealth(), { status: 'degraded', nodes: 1, adapter: { status: 'down' } })
  const acme = await createCompany(a.app)
  const stream = companyStream(acme.id)
  const onB = await connect(t, b.url, acme.as('member').token)
  // Published on A while Redis is down: B's client gets nothing yet (nothing crashes either).
  t.equal((await a.app.inject({ method: 'POST', url: '/projects', headers: authHeader(acme.as('admin')), payload: { name: 'offline' } })).statusCode, 201)

  await redis.start()
  await waitFor(async () => (await Promise.all([a, b].map(n => n.app.websocketHealth()))).every(h => h.status === 'ok' && h.nodes === 2), 10_000, 'both nodes subscribed')
  const live = record(onB)
  t.equal((await a.app.inject({ method: 'POST', url: '/projects', headers: authHeader(acme.as('admin')), payload: { name: 'online' } })).statusCode, 201)
  await waitFor(() => live.some(e => e.event === 'project:created' && e.payload.seq === 2), 5000, 'seq 2 on node B')
  // Cross-node delivery works once Redis is up. A's publish of seq 1, buffered by ioredis during
  // the outage, may be flushed on reconnect: then it arrives late but still before seq 2.
  const liveSeqs = live.filter(e => e.event === 'project:created').map(e => e.payload.seq)
  t.ok(JSON.stringify(liveSeqs) === '[2]' || JSON.stringify(liveSeqs) === '[1,2]', `in order, once (${JSON.stringify(liveSeqs)})`)
  t.match(live.find(e => e.payload?.seq === 2)?.payload, { stream, seq: 2, data: { project: { name: 'online' } } })
  // A client that saw seq 2 after nothing resumes and gets the event it missed.
  const replayed = record(onB)
  const ack = await request(onB, 'sync:resume', { streams: { [stream]: 0 } })
  t.match(ack, { ok: true, streams: { [stream]: { recovered: true, headSeq: 2 } } })
  t.match(replayed.filter(e => e.event === 'project:created').map(e => e.payload), [{ seq: 1, data: { project: { name: 'offline' } } }, { seq: 2 }])
})

t.test('health never hangs on a stalled Redis: nodes falls back to 1 after redisTimeoutMs', async (t) => {
  const redis = await dedicatedRedis(t)
  const db = await testDatabase(t)
  const socket = { redis: redis.url, redisPrefix: uniqueName('erp_slow'), redisTimeoutMs: 200 }
  const { app } = await build(t, { db, realtime: { socket } })
  await build(t, { db, realtime: { socket } })
  await waitFor(async () => (await app.websocketHealth()).nodes === 2, 5000, 'two nodes')
  // SIGSTOP: the server stops answering while every connection stays open and "ready".
  await redis.pause()
  await sleep(HEALTH_PROBE_REUSE_MS + 50) // the two-node count is no longer reused
  let started = performance.now()
  const response = await app.inject({ url: '/health/websocket' })
  t.ok(performance.now() - started < 700, 'answered after redisTimeoutMs, not Redis')
  t.match(response.json(), { nodes: 1 }, 'answered without waiting for Redis')
  await redis.resume()
  await waitFor(async () => (await app.erpSocket.serverCount()) === 2, 5000, 'counts again once Redis answers')
  started = performance.now()
  await app.inject({ url: '/health/websocket' })
  t.ok(performance.now() - started < 700)
})

t.test('a hung Redis (SIGSTOP) is reported down, health says degraded, publishes are not queued without limit', async (t) => {
  const redis = await dedicatedRedis(t)
  const db = await testDatabase(t)
  const { app } = await build(t, { db, realtime: { socket: { redis: redis.url, redisPrefix: uniqueName('erp_hang'), redisTimeoutMs: 200 } } })
  await waitFor(() => app.erpSocket.adapterStatus() === 'up', 5000, 'adapter up')
  const adapter = app.io.of('/').adapter as unknown as { pubClient: Redis, subClient: Redis }
  t.equal(adapter.pubClient.options.commandTimeout, 2000, 'the publisher created from the URL has a command timeout')
  t.equal(adapter.subClient.options.commandTimeout, undefined, 'the subscriber keeps waiting')
  const pending = () => {
    const client = adapter.pubClient as unknown as { commandQueue: { length: number }, offlineQueue: { length: number } }
    return client.commandQueue.length + client.offlineQueue.length
  }

  await redis.pause()
  t.equal(app.erpSocket.adapterStatus(), 'up', 'a hang is not visible before Redis is asked something')
  const started = performance.now()
  const first = await app.inject({ url: '/health/websocket' })
  t.ok(performance.now() - started < 700, 'bounded by redisTimeoutMs')
  t.match(first.json(), { status: 'degraded', nodes: 1, adapter: { type: 'redis', status: 'down' }, database: { status: 'up' } })
  t.equal(app.erpSocket.adapterStatus(), 'down', 'down until Redis answers')
  const quick = performance.now()
  t.equal(await app.erpSocket.serverCount(), 1)
  t.ok(performance.now() - quick < 50, 'no more waiting for Redis while it is known down')

  const payload = 'x'.repeat(10_000)
  for (let i = 0; i < 500; i++) app.erpSocket.toOtherNodes('erp:events', [{ payload } as never])
  t.ok(pending() < 10, `publishes are refused, not queued with their payloads (${pending()} pending)`)

  await redis.resume()
  await waitFor(() => app.erpSocket.adapterStatus() === 'up', 5000, 'up again once a PING is answered')
  t.match((await app.inject({ url: '/health/websocket' })).json(), { status: 'ok', adapter: { status: 'up' } })
  await waitFor(() => pending() === 0, 5000, 'nothing left queued')
})

t.test('a publish that fails is handled, never an unhandled rejection', async (t) => {
  const client = new Redis('redis://127.0.0.1:1', { lazyConnect: true, maxRetriesPerRequest: 0, enableOfflineQueue: false })
  client.on('error', () => {})
  t.teardown(() => client.disconnect())
  const failures: string[] = []
  const view = guardCommands(client, (err) => failures.push(err.message))
  t.equal(view.constructor, client.constructor, 'constructor is not wrapped (the adapter reads its name)')
  t.equal(view.on('ready', () => {}), view, 'chaining returns the view')
  t.equal(view.status, 'wait')
  const result = view.publish('channel', 'message')
  await t.rejects(result, 'the caller still sees the failure')
  t.equal(failures.length, 1, 'and so does the guard')

  const closing = guardCommands(client, (err) => failures.push(err.message), () => true)
  await t.rejects(closing.publish('channel', 'message'))
  t.equal(failures.length, 1, 'failures while closing are not reported')
})

t.test('toOtherNodes never throws into the publisher', async (t) => {
  const { app } = await build(t, { realtime: { socket: { redis: TEST_REDIS_URL, redisPrefix: uniqueName('erp_emit') } } })
  const toOtherNodes = app.erpSocket.toOtherNodes as (event: string, ...args: unknown[]) => void
  t.doesNotThrow(() => toOtherNodes('connect', []), 'a reserved event name is logged, not thrown')
  t.doesNotThrow(() => app.erpSocket.toOtherNodes('erp:events', []))
})

t.test('redis, coalescing and server options are validated at registration', async (t) => {
  for (const [options, message] of [
    [{ redis: 'http://localhost:6379' }, /invalid option redis/],
    [{ redis: TEST_REDIS_URL, redisTimeoutMs: 0 }, /invalid option redisTimeoutMs/],
    [{ redis: TEST_REDIS_URL, redisPrefix: '' }, /invalid option redisPrefix/],
    [{ coalesceWrites: { sliceSize: 0 } }, /invalid option coalesceWrites/],
    [{ coalesceWrites: { slices: 4 } as never }, /invalid option coalesceWrites/],
    // Recovered sockets would skip erp-auth's middleware (Socket.IO's skipMiddlewares default).
    [{ serverOptions: { connectionStateRecovery: {} } as never }, /invalid option serverOptions\.connectionStateRecovery: is not supported: recovered sockets would skip authentication/]
  ] as const) {
    const app = Fastify()
    app.register(erpSocket, options)
    await t.rejects(async () => { await app.ready() }, message)
  }
})

t.test('REDIS_PREFIX and SYNC_HEAD_INTERVAL_MS are read from the environment', async (t) => {
  const config = loadConfig({ REDIS_PREFIX: 'tenant-a:erp', SYNC_HEAD_INTERVAL_MS: '2500' })
  t.equal(config.redisPrefix, 'tenant-a:erp')
  t.equal(config.syncHeadIntervalMs, 2500)
  t.equal(loadConfig({}).redisPrefix, undefined)
  t.throws(() => loadConfig({ REDIS_PREFIX: 'has space' }), new ConfigError('REDIS_PREFIX', 'must be 1-91 letters, digits, or . : _ -'))
  t.throws(() => loadConfig({ SYNC_HEAD_INTERVAL_MS: '-1' }), ConfigError)

  // The env reaches the plugins: prefix on the adapter, interval on the beacon.
  const redisPrefix = uniqueName('erp_env')
  const { app } = await build(t, { config: { redisUrl: TEST_REDIS_URL, redisPrefix } })
  t.equal(app.erpSocket.redisPrefix, redisPrefix)
  await waitFor(async () => (await subscribers(TEST_REDIS_URL, requestChannel(redisPrefix))) === 1, 5000, 'the adapter subscribed under REDIS_PREFIX')
})
