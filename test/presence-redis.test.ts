import { Redis } from 'ioredis'
import t from 'tap'
import type { ErpPresenceOptions } from '../plugins/presence/index.ts'
import { RedisPresenceStore } from '../plugins/presence/redis-store.ts'
import { dedicatedRedis } from './cluster-helpers.ts'
import {
  build, connect, createCompany, request, sleep, testDatabase, TEST_REDIS_URL, uniqueName, waitFor, type TestLike
} from './helpers.ts'
import {
  badPayloadsChangeNothing, companiesStayApart, entryOf, FAST, list, reconnectInsideGrace, twoDevicesThenGrace, watch
} from './presence-scenarios.ts'

/** A unique key prefix whose keys are deleted after everything else in the test has closed. */
function redisPrefix (t: TestLike, name = 'presence'): string {
  const prefix = uniqueName(name)
  // Registered first, so it runs last (teardowns run in reverse order).
  t.teardown(async () => {
    const redis = new Redis(TEST_REDIS_URL)
    let cursor = '0'
    do {
      const [next, keys] = await redis.scan(cursor, 'MATCH', `${prefix}:*`, 'COUNT', 1000)
      cursor = next
      if (keys.length > 0) await redis.del(...keys)
    } while (cursor !== '0')
    await redis.quit()
  })
  return prefix
}

function redisPresence (prefix: string, extra: Partial<ErpPresenceOptions> = {}): ErpPresenceOptions {
  return { ...FAST, store: { redis: TEST_REDIS_URL, prefix }, ...extra }
}

/** Two app instances on one database, each with its own Redis adapter and presence connection. */
async function twoNodes (t: TestLike, presence: Partial<ErpPresenceOptions> = {}) {
  const prefix = redisPrefix(t)
  const db = await testDatabase(t)
  const realtime = {
    socket: { redis: TEST_REDIS_URL, redisPrefix: `${prefix}-adapter` },
    presence: redisPresence(prefix, presence)
  }
  const a = await build(t, { db, realtime })
  const b = await build(t, { db, realtime })
  return { a, b, prefix }
}

t.test('redis store: two devices of one user, then the grace period', async t => {
  const prefix = redisPrefix(t)
  const { app, url } = await build(t, { realtime: { presence: redisPresence(prefix) } })
  t.equal(app.presence.store.kind, 'redis')
  await twoDevicesThenGrace(t, url, await createCompany(app, ['admin', 'member']), FAST.graceMs)
})

t.test('redis store: bad presence:set payloads are refused and change nothing', async t => {
  const prefix = redisPrefix(t)
  const { app, url } = await build(t, { realtime: { presence: redisPresence(prefix) } })
  await badPayloadsChangeNothing(t, url, await createCompany(app, ['admin', 'member']))
})

t.test('two nodes sharing Redis: the same presence:list on both, changes reach the other node', async t => {
  const { a, b } = await twoNodes(t)
  const company = await createCompany(a.app, ['admin', 'manager', 'member'])
  const onA = await watch(t, a.url, company.as('admin').token)
  const onB = await watch(t, b.url, company.as('manager').token)
  const member = company.as('member')

  const phone = await connect(t, a.url, member.token)
  const laptop = await connect(t, b.url, member.token)
  await waitFor(() => onA.about(member.id).length === 2 && onB.about(member.id).length === 2, 5000, 'both nodes see both devices')
  const expected = [{ userId: member.id, status: 'online', devices: 1 }, { userId: member.id, status: 'online', devices: 2 }]
  t.same(onA.about(member.id), expected, 'node A: one online event, then devices: 2 (one device on each node)')
  t.same(onB.about(member.id), expected, 'node B saw the same')

  const listA = await list(onA.socket)
  t.same(await list(onB.socket), listA, 'both nodes answer the same list')
  t.same(listA.map(u => u.userId).sort(), company.users.map(u => u.id).sort())
  t.match(listA.find(u => u.userId === member.id), { status: 'online', devices: 2 })

  t.same(await request(laptop, 'presence:set', { status: 'busy', viewing: { type: 'project', id: 'p-7' } }), { ok: true })
  await waitFor(() => onA.about(member.id).length === 3, 5000, 'the change made on node B reaches node A')
  t.same(onA.about(member.id)[2], { userId: member.id, status: 'busy', devices: 2, viewing: { type: 'project', id: 'p-7' } })
  t.same(await list(onA.socket), await list(onB.socket))

  phone.disconnect()
  await waitFor(() => onB.about(member.id).length === 4, 5000, 'the disconnect on node A reaches node B')
  t.same(onB.about(member.id)[3], { userId: member.id, status: 'busy', devices: 1, viewing: { type: 'project', id: 'p-7' } })
  await sleep(100)
  t.equal(onA.about(member.id).length, 4, 'each change is announced once, not once per node')
})

t.test('two nodes: a reconnect to the other node inside the grace period announces nothing', async t => {
  const { a, b } = await twoNodes(t)
  await reconnectInsideGrace(t, a.url, await createCompany(a.app, ['admin', 'member']), FAST.graceMs, b.url)
})

t.test('two nodes: no presence event or list entry crosses companies', async t => {
  const { a, b } = await twoNodes(t)
  const acme = await createCompany(a.app, ['admin', 'member'])
  const globex = await createCompany(a.app, ['admin', 'member'])
  await companiesStayApart(t, [a.url, b.url], acme, globex)
})

t.test('a node that stops without cleanup: its users go offline within the TTL on the surviving node', async t => {
  const { a: survivor, b: doomed } = await twoNodes(t)
  const company = await createCompany(survivor.app, ['admin', 'member', 'member'])
  const [, first, second] = company.users
  const observer = await watch(t, survivor.url, company.as('admin').token)
  await connect(t, doomed.url, first!.token)
  await connect(t, doomed.url, first!.token)
  const secondOnSurvivor = await connect(t, survivor.url, second!.token)
  await connect(t, doomed.url, second!.token)
  await waitFor(async () => (await entryOf(observer.socket, second!.id))?.devices === 2 && (await entryOf(observer.socket, first!.id))?.devices === 2,
    5000, 'two devices each')

  const died = Date.now()
  doomed.app.presence.abandon() // no heartbeat, no sweep, no disconnect handling: a crash
  await doomed.app.close()
  await waitFor(() => observer.about(first!.id).some(c => c.status === 'offline') && observer.about(second!.id).length === 3,
    FAST.ttlMs + 2000, 'the dead node’s entries expire')
  const elapsed = Date.now() - died
  t.ok(elapsed <= FAST.ttlMs + FAST.sweepIntervalMs + 500, `announced ${elapsed} ms after the node died (ttl ${FAST.ttlMs} ms)`)
  t.same(observer.about(first!.id).filter(c => c.status === 'offline'), [{ userId: first!.id, status: 'offline', devices: 0 }],
    'one offline event for a user whose two sockets died together')
  t.same(observer.about(second!.id).at(-1), { userId: second!.id, status: 'online', devices: 1 }, 'a user still connected elsewhere stays online with one device')
  t.same((await list(observer.socket)).map(u => u.userId).sort(), [company.as('admin').id, second!.id].sort())
  t.ok(secondOnSurvivor.connected)
})

t.test('a node that closes cleanly: the surviving node ends its users’ grace periods', async t => {
  const { a: survivor, b: leaving } = await twoNodes(t)
  const company = await createCompany(survivor.app, ['admin', 'member'])
  const member = company.as('member')
  const observer = await watch(t, survivor.url, company.as('admin').token)
  await connect(t, leaving.url, member.token)
  await waitFor(() => observer.about(member.id).length === 1, 5000, 'online')

  const closed = Date.now()
  await leaving.app.close()
  await waitFor(() => observer.about(member.id).length === 2, FAST.graceMs + 2000, 'offline after the grace')
  t.same(observer.about(member.id)[1], { userId: member.id, status: 'offline', devices: 0 })
  t.ok(Date.now() - closed >= FAST.graceMs, 'not before the grace period ends')
})

t.test('redis store: keys under the prefix, nothing left behind, a client passed in is not closed', async t => {
  const prefix = redisPrefix(t)
  const client = new Redis(TEST_REDIS_URL)
  t.teardown(() => client.quit())
  const { app, url } = await build(t, { realtime: { presence: { ...FAST, store: { redis: client, prefix } } } })
  const company = await createCompany(app, ['admin', 'member'])
  const member = await connect(t, url, company.as('member').token)
  await waitFor(async () => (await app.presence.list(company.id)).length === 1, 5000, 'listed')
  t.same((await client.keys(`${prefix}:*`)).sort(), [`${prefix}:expiry`, `${prefix}:sockets:${company.id}`, `${prefix}:users:${company.id}`])

  member.disconnect()
  await waitFor(async () => (await app.presence.list(company.id)).length === 0, FAST.graceMs + 2000, 'offline')
  t.same(await client.keys(`${prefix}:*`), [], 'an empty company leaves no keys')

  await app.close()
  t.equal(await client.ping(), 'PONG', 'the caller’s client is still open')
  t.equal(client.listenerCount('error'), 0, 'the store removed its listeners')
})

t.test('redis store: the sweep drops expiry members it cannot read', async t => {
  const prefix = redisPrefix(t)
  const { app } = await build(t, { realtime: { presence: redisPresence(prefix, { sweepIntervalMs: 60_000, heartbeatMs: 60_000, ttlMs: 120_000 }) } })
  const redis = (app.presence.store as RedisPresenceStore).redis
  await redis.zadd(`${prefix}:expiry`, 0, 'not json', 0, JSON.stringify(['x', 'a', 'b']), 0, JSON.stringify({ s: 1 }))
  t.equal(await app.presence.sweep(), 0, 'nothing announced')
  t.equal(await redis.zcard(`${prefix}:expiry`), 0, 'and nothing left to block the next sweep')
})

t.test('redis store: an outage answers SERVICE_UNAVAILABLE, never crashes, and presence comes back', async t => {
  // A redis-server of this test's own: it can be killed, and starts with no scripts loaded.
  const redis = await dedicatedRedis(t)
  const presence: ErpPresenceOptions = {
    ...FAST,
    store: { redis: redis.url, prefix: 'presence', redisOptions: { maxRetriesPerRequest: 0, retryStrategy: () => 50 } }
  }
  const { app, url } = await build(t, { realtime: { presence } })
  const company = await createCompany(app, ['admin', 'member'])
  const observer = await watch(t, url, company.as('admin').token)
  await connect(t, url, company.as('member').token)
  await waitFor(async () => (await list(observer.socket)).length === 2, 5000, 'both listed')

  await redis.stop()
  await sleep(200) // heartbeats and sweeps fail meanwhile
  const answer = await request(observer.socket, 'presence:list')
  t.equal(answer.error?.code, 'SERVICE_UNAVAILABLE')
  const set = await request(observer.socket, 'presence:set', { status: 'away' })
  t.equal(set.error?.code, 'SERVICE_UNAVAILABLE')

  // Restarted empty (a lost cache): the heartbeat finds its entries gone and re-adds them.
  await redis.start()
  await waitFor(async () => {
    const retry = await request(observer.socket, 'presence:list')
    return retry.ok === true && retry.users.length === 2
  }, 10_000, 'presence rebuilt by the heartbeat')
  t.ok(observer.socket.connected)
})

t.test('RedisPresenceStore reports connection errors once per outage', async t => {
  const errors: string[] = []
  const store = new RedisPresenceStore({
    redis: 'redis://127.0.0.1:1',
    prefix: uniqueName('presence'),
    redisOptions: { maxRetriesPerRequest: 0, retryStrategy: () => 20, lazyConnect: false },
    onError: err => errors.push(err.message)
  })
  await t.rejects(store.list('company'))
  await sleep(200)
  t.equal(new Set(errors).size, errors.length, 'each distinct error reported once')
  t.ok(errors.length >= 1)
  await store.close()
})
