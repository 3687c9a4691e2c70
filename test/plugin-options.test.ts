import t from 'tap'
import Fastify from 'fastify'
import { Redis } from 'ioredis'
import { buildApp } from '../src/app.ts'
import erpSocket from '../plugins/socket/index.ts'
import erpRealtime, { type ErpRealtimeOptions } from '../plugins/index.ts'
import { dedicatedRedis } from './cluster-helpers.ts'
import { every } from '../plugins/support.ts'
import { testConfig, testDatabase, waitFor } from './helpers.ts'

// Regression: the plugins' option schemas dropped unknown keys, so a misspelled option
// (`presence: { graceMS }`) ran silently with the default instead of failing registration.
t.test('a misspelled option stops the registration with a message naming the plugin and the key', async t => {
  const db = await testDatabase(t)
  const cases: Array<[keyof ErpRealtimeOptions, string]> = [
    ['socket', 'erp-socket'],
    ['auth', 'erp-auth'],
    ['presence', 'erp-presence'],
    ['eventLog', 'erp-offline-queue'],
    ['conflicts', 'erp-conflicts'],
    ['idempotency', 'erp-idempotency'],
    ['health', 'erp-health']
  ]
  for (const [section, plugin] of cases) {
    await t.rejects(
      buildApp({ config: testConfig(), db, realtime: { [section]: { graceMS: 1000 } } }),
      { message: `${plugin}: invalid options: Unrecognized key: "graceMS"` },
      `${section} → ${plugin}`
    )
  }
  await t.rejects(
    buildApp({ config: testConfig(), db, realtime: { presense: {} } as never }),
    { message: 'erp-realtime: invalid options: Unrecognized key: "presense"' },
    'a misspelled section of the umbrella too'
  )
})

// Regression (HTTP review): a delay above Node's timer bound (2^31 - 1 ms) was accepted, and
// Node replaced it by 1 ms: `pruneIntervalMs: 2_592_000_000` (monthly) ran the prune back to back.
t.test('a delay beyond the timers\' bound or a retention beyond ten years stops the registration', async t => {
  const db = await testDatabase(t)
  const tooLong = 2 ** 31
  const cases: Array<[Partial<ErpRealtimeOptions>, string]> = [
    [{ eventLog: { pruneIntervalMs: tooLong } }, 'erp-offline-queue: invalid option pruneIntervalMs'],
    [{ eventLog: { headIntervalMs: tooLong } }, 'erp-offline-queue: invalid option headIntervalMs'],
    [{ eventLog: { transactionTimeoutMs: tooLong } }, 'erp-offline-queue: invalid option transactionTimeoutMs'],
    [{ eventLog: { transactionMaxWaitMs: tooLong } }, 'erp-offline-queue: invalid option transactionMaxWaitMs'],
    [{ eventLog: { ttlSeconds: 11 * 365 * 24 * 3600 } }, 'erp-offline-queue: invalid option ttlSeconds'],
    [{ conflicts: { pruneIntervalMs: tooLong } }, 'erp-conflicts: invalid option pruneIntervalMs'],
    [{ conflicts: { revisionTtlSeconds: 11 * 365 * 24 * 3600 } }, 'erp-conflicts: invalid option revisionTtlSeconds'],
    [{ idempotency: { pruneIntervalMs: tooLong } }, 'erp-idempotency: invalid option pruneIntervalMs'],
    [{ presence: { heartbeatMs: tooLong, ttlMs: tooLong } }, 'erp-presence: invalid option heartbeatMs'],
    [{ presence: { sweepIntervalMs: tooLong } }, 'erp-presence: invalid option sweepIntervalMs'],
    [{ health: { databaseTimeoutMs: tooLong } }, 'erp-health: invalid option databaseTimeoutMs']
  ]
  for (const [realtime, message] of cases) {
    await t.rejects(buildApp({ config: testConfig(), db, realtime }), { message: new RegExp(`^${message}: `) }, message)
  }
  // The largest delay is taken as it is.
  const app = await buildApp({ config: testConfig(), db, realtime: { conflicts: { pruneIntervalMs: 2 ** 31 - 1 } } })
  await app.close()
})

t.test('every() refuses an interval Node would replace by 1 ms', async t => {
  const app = Fastify()
  t.teardown(() => app.close())
  t.throws(() => every(app, 2 ** 31, 'monthly job', async () => {}), { name: 'RangeError', message: 'monthly job: the interval must be 0 to 2147483647 ms, not 2147483648' })
  t.throws(() => every(app, 1.5, 'job', async () => {}), RangeError)
})

t.test('Fastify\'s own register options are not taken for unknown plugin options', async t => {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(erpSocket, { logLevel: 'warn', nodeId: 'node-a' })
  await app.ready()
  t.equal(app.erpSocket.nodeId, 'node-a')
})

t.test('the caller-owned Redis clients option refuses an unknown key too', async t => {
  const pubClient = new Redis({ lazyConnect: true })
  const subClient = new Redis({ lazyConnect: true })
  t.teardown(() => { pubClient.disconnect(); subClient.disconnect() })
  const app = Fastify()
  t.teardown(() => app.close())
  await t.rejects(
    async () => { await app.register(erpSocket, { redis: { pubClient, subClient, subscriberClient: subClient } as never }) },
    /^erp-socket: invalid option redis/
  )
})

/** Connections a private Redis has, besides the one asking. */
async function redisConnections (url: string): Promise<number> {
  const client = new Redis(url)
  try {
    return String(await client.client('LIST')).trim().split('\n').length - 1
  } finally {
    client.disconnect()
  }
}

// Regression (lifecycle review): erp-socket created the Socket.IO server and its two Redis
// connections before decorate('io') failed on a taken name, and added its close hook only after
// it: the connections stayed open after app.close(), and the process did not exit.
t.test('a decorator name already taken fails the registration before anything is created', async t => {
  const redis = await dedicatedRedis(t)
  const app = Fastify()
  app.decorate('io', { taken: 'by another Socket.IO plugin' } as never)
  await t.rejects(
    async () => { await app.register(erpSocket, { redis: redis.url }) },
    { message: 'erp-socket: fastify.io is already decorated (another plugin uses the name)' }
  )
  await app.close()
  await waitFor(async () => await redisConnections(redis.url) === 0, 3000, 'no connection left').catch(() => {})
  t.equal(await redisConnections(redis.url), 0, 'no Redis connection left open')
})

// Regression (lifecycle review): buildApp threw without closing the app when a registration
// failed after others had opened Redis connections, and the caller had no app to close.
t.test('buildApp closes what it created when a registration fails', async t => {
  const redis = await dedicatedRedis(t)
  const db = await testDatabase(t)
  await t.rejects(
    buildApp({ config: testConfig({ redisUrl: redis.url }), db, realtime: { idempotency: { waitMs: -1 } } }),
    /^erp-idempotency: invalid option/
  )
  await waitFor(async () => await redisConnections(redis.url) === 0, 3000, 'no connection left').catch(() => {})
  t.equal(await redisConnections(redis.url), 0, 'no Redis connection left open')
})

// Regression (review of the check above): it used hasDecorator, which also sees the parent
// contexts' decorators, so a host app with its own `authenticate` could no longer register
// erp-realtime in a child context, as Fastify allows (shadowing).
t.test('a decorator of a parent context may be shadowed: the umbrella registers in a child context of an app with its own authenticate', async t => {
  const db = await testDatabase(t)
  const app = Fastify()
  t.teardown(() => app.close())
  app.decorate('authenticate', async () => { throw new Error('the host app\'s own') })
  await app.register(async (child) => {
    await child.register(erpRealtime, { prisma: db.prisma, jwtSecret: testConfig().jwtSecret, eventLog: { headIntervalMs: 0, pruneIntervalMs: 0 } })
    t.not(child.authenticate, app.authenticate, 'the child context has erp-auth\'s')
  })
  await app.ready()
})

// Regression (adopter review): the umbrella registered erp-socket, which connects to Redis, before
// the later sections' options were checked: a bad option there left two Redis connections open
// and the process running unless the caller knew to close the app.
t.test('the umbrella checks every section before anything is opened; a bad jwtSecret is named as such', async t => {
  const redis = await dedicatedRedis(t)
  const db = await testDatabase(t)
  const cases: Array<[Partial<ErpRealtimeOptions>, RegExp]> = [
    [{ jwtSecret: 'short' }, /^erp-realtime: invalid option jwtSecret: /],
    [{ health: { databaseTimeoutMs: -1 } }, /^erp-health: invalid option databaseTimeoutMs: /]
  ]
  for (const [options, message] of cases) {
    const app = Fastify()
    t.teardown(() => app.close())
    await t.rejects(
      async () => { await app.register(erpRealtime, { prisma: db.prisma, jwtSecret: 'x'.repeat(32), socket: { redis: redis.url }, ...options }) },
      { message }
    )
    t.equal(await redisConnections(redis.url), 0, 'no Redis connection was opened')
  }
})
