import t from 'tap'
import Fastify from 'fastify'
import { Redis } from 'ioredis'
import { buildApp } from '../src/app.ts'
import erpSocket from '../plugins/socket/index.ts'
import type { ErpRealtimeOptions } from '../plugins/index.ts'
import { testConfig, testDatabase } from './helpers.ts'

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
