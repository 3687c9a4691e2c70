import net from 'node:net'
import { isDeepStrictEqual } from 'node:util'
import Fastify, { type FastifyInstance } from 'fastify'
import erpRealtime from '../plugins/index.ts'
import { Redis } from 'ioredis'
import t, { type Test } from 'tap'
import type { PresenceChanged } from '../plugins/events.ts'
import type { ErpPresenceOptions } from '../plugins/presence/index.ts'
import { RedisPresenceStore } from '../plugins/presence/redis-store.ts'
import { PartialSweepError, type Departure, type PresenceStore } from '../plugins/presence/store.ts'
import { dedicatedRedis } from './cluster-helpers.ts'
import {
  dropRedisPrefix,
  build, connect, createCompany, request, sleep, testDatabase, TEST_REDIS_URL, uniqueName, waitFor, type TestLike
} from './helpers.ts'
import {
  badPayloadsChangeNothing, companiesStayApart, entryOf, FAST, increasing, list, reconnectInsideGrace, storeRevisionsOnlyGrow,
  twoDevicesThenGrace, watch, type Watcher
} from './presence-scenarios.ts'

/** A unique key prefix whose keys are deleted after everything else in the test has closed. */
function redisPrefix (t: TestLike, name = 'presence'): string {
  const prefix = uniqueName(name)
  // Registered first, so it runs last (teardowns run in reverse order).
  t.teardown(() => dropRedisPrefix(TEST_REDIS_URL, prefix))
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

/** Two nodes, each watched by one user of a company; `member` is the user whose presence changes. */
async function watchedNodes (t: TestLike) {
  const { a, b } = await twoNodes(t)
  const company = await createCompany(a.app, ['admin', 'manager', 'member'])
  const onA = await watch(t, a.url, company.as('admin').token)
  const onB = await watch(t, b.url, company.as('manager').token)
  return { a, b, company, onA, onB, member: company.as('member') }
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
  const { a, b, company, onA, onB, member } = await watchedNodes(t)
  const latest = (watcher: Watcher) => watcher.about(member.id).at(-1)
  const bothAt = (expected: object) => async () =>
    isDeepStrictEqual(latest(onA), expected) && isDeepStrictEqual(latest(onB), expected)

  const phone = await connect(t, a.url, member.token)
  const laptop = await connect(t, b.url, member.token)
  // Node A announces one device and node B two; a node may get the other's announcement after its
  // own newer one, and then drops it. What each node's clients see is in rev order and ends the same.
  const twoDevices = { userId: member.id, status: 'online', devices: 2 }
  await waitFor(bothAt(twoDevices), 5000, 'both nodes end at devices: 2')
  for (const [name, watcher] of [['A', onA], ['B', onB]] as const) {
    t.ok(increasing(watcher.revs(member.id)), `node ${name}: revs only go up (${watcher.revs(member.id).join(', ')}), no stale change after a newer one`)
    const seen = watcher.about(member.id)
    t.ok(seen.every(c => c.status === 'online') && [[1, 2], [2]].some(devices => isDeepStrictEqual(seen.map(c => c.devices), devices)),
      `node ${name}: devices 1 then 2, or 2 alone (a stale 1 arriving later dropped): ${JSON.stringify(seen)}`)
  }
  t.equal(onA.revs(member.id).at(-1), onB.revs(member.id).at(-1), 'both nodes end at the same rev')

  const listA = await list(onA.socket)
  t.same(await list(onB.socket), listA, 'both nodes answer the same list')
  t.same(listA.map(u => u.userId).sort(), company.users.map(u => u.id).sort())
  t.match(listA.find(u => u.userId === member.id), { status: 'online', devices: 2, rev: onA.revs(member.id).at(-1) },
    'the list matches what both nodes announced last, rev included')

  t.same(await request(laptop, 'presence:set', { status: 'busy', viewing: { type: 'project', id: 'p-7' } }), { ok: true })
  const busy = { userId: member.id, status: 'busy', devices: 2, viewing: { type: 'project', id: 'p-7' } }
  await waitFor(bothAt(busy), 5000, 'the change made on node B reaches node A')
  t.same(await list(onA.socket), await list(onB.socket))

  phone.disconnect()
  const oneDevice = { ...busy, devices: 1 }
  await waitFor(bothAt(oneDevice), 5000, 'the disconnect on node A reaches node B')
  await sleep(100)
  for (const [name, watcher] of [['A', onA], ['B', onB]] as const) {
    t.ok(increasing(watcher.revs(member.id)), `node ${name}: each change delivered once, in rev order (${watcher.revs(member.id).join(', ')})`)
    t.same(watcher.about(member.id).slice(-2), [busy, oneDevice], `node ${name}: busy, then one device left`)
  }
  t.match(await entryOf(onB.socket, member.id), { ...oneDevice, rev: onB.revs(member.id).at(-1) }, 'and the list agrees')
})

// Regression (presence review): with erp-socket on Redis and erp-presence left at its default, each
// node kept its own presence in memory and relayed its announcements to the others: a user who left
// node A while still on node B was announced offline everywhere, and A's list left them out.
t.test('presence left unset on a Redis adapter is shared through that Redis: leaving one node is not an offline', async t => {
  const prefix = redisPrefix(t)
  const db = await testDatabase(t)
  const realtime = { socket: { redis: TEST_REDIS_URL, redisPrefix: prefix }, presence: { ...FAST } }
  const a = await build(t, { db, realtime })
  const b = await build(t, { db, realtime })
  const company = await createCompany(a.app, ['admin', 'member'])
  const member = company.as('member')
  const onA = await watch(t, a.url, company.as('admin').token)
  const phone = await connect(t, a.url, member.token)
  await connect(t, b.url, member.token)
  await waitFor(async () => (await entryOf(onA.socket, member.id))?.devices === 2, 5000, 'two devices, across nodes')
  phone.disconnect()
  await waitFor(async () => (await entryOf(onA.socket, member.id))?.devices === 1, 5000, 'one device left')
  await sleep(FAST.graceMs! + 300)
  t.notOk(onA.about(member.id).some(change => change.status === 'offline'), 'never announced offline')
  t.match(await entryOf(onA.socket, member.id), { status: 'online', devices: 1 })
  const probe = new Redis(TEST_REDIS_URL)
  t.teardown(() => probe.disconnect())
  t.ok((await probe.keys(`${prefix}:presence:*`)).length > 0, 'kept under <redisPrefix>:presence')
})

// Regression (review of the retry): a grace end whose reply came later than both tries had ended in
// Redis (entry and user gone, nothing for a sweep) and its failure was only logged: the user stayed
// online on every client for good. The node now asks again, and the store answers the offline.
t.test('a grace end that failed though its script ran is asked again, and the offline is announced', async t => {
  const prefix = redisPrefix(t)
  let lose = 1
  class LateRepliesStore extends RedisPresenceStore {
    override async endGrace (...args: Parameters<RedisPresenceStore['endGrace']>) {
      const offline = await super.endGrace(...args)
      if (lose-- > 0) throw new Error('Command timed out (test: the script ran, its reply came too late)')
      return offline
    }
  }
  const store = new LateRepliesStore({ redis: TEST_REDIS_URL, prefix })
  t.teardown(() => store.close())
  const { app, url } = await build(t, { realtime: { presence: { ...FAST, store } } })
  const company = await createCompany(app, ['admin', 'member'])
  const member = company.as('member')
  const watcher = await watch(t, url, company.as('admin').token)
  const phone = await connect(t, url, member.token)
  await waitFor(() => watcher.about(member.id).some(change => change.status === 'online'), 5000, 'online')
  phone.disconnect()
  await waitFor(() => watcher.about(member.id).some(change => change.status === 'offline'), 8000, 'the offline, announced by the second ask')
  t.equal(lose, -1, 'asked twice')
  t.same(await list(watcher.socket).then(users => users.map(user => user.userId)), [company.as('admin').id])
})

t.test('a Redis that stops answering does not hold close when erp-socket was given clients without a command timeout', async t => {
  const redis = await dedicatedRedis(t)
  const pubClient = new Redis(redis.url)
  const subClient = pubClient.duplicate()
  t.teardown(() => { pubClient.disconnect(); subClient.disconnect() })
  const { app, url } = await build(t, { realtime: { socket: { redis: { pubClient, subClient } }, presence: { ...FAST } } })
  const company = await createCompany(app, ['admin'])
  await connect(t, url, company.as('admin').token)
  await redis.pause()
  t.teardown(() => redis.resume())
  const started = Date.now()
  await app.close()
  t.ok(Date.now() - started < 8000, `closed in ${Date.now() - started} ms`)
})

t.test("the 'memory' presence store with erp-socket on Redis is refused at registration", async t => {
  const db = await testDatabase(t)
  await t.rejects(
    build(t, { db, realtime: { socket: { redis: TEST_REDIS_URL, redisPrefix: uniqueName('refused') }, presence: { store: 'memory' } } }),
    { message: /^erp-presence: the 'memory' store keeps presence on this node, but erp-socket shares rooms across nodes through Redis/ }
  )
  // The umbrella refuses it before erp-socket connects to Redis.
  const redis = await dedicatedRedis(t)
  const app = Fastify()
  t.teardown(() => app.close())
  await t.rejects(async () => { await app.register(erpRealtime, { prisma: db.prisma, jwtSecret: 'x'.repeat(32), socket: { redis: redis.url }, presence: { store: 'memory' } }) }, /the 'memory' store/)
  const probe = new Redis(redis.url)
  t.teardown(() => probe.disconnect())
  t.equal(String(await probe.client('LIST')).trim().split('\n').length - 1, 0, 'no connection was opened')
})

t.test('the presence connection opened on the adapter\'s Redis is closed with the app', async t => {
  const redis = await dedicatedRedis(t)
  const { app } = await build(t, { realtime: { socket: { redis: redis.url } } })
  const probe = new Redis(redis.url)
  t.teardown(() => probe.disconnect())
  const connections = async () => String(await probe.client('LIST')).trim().split('\n').length - 1
  t.equal(await connections(), 3, 'the adapter\'s two and presence\'s one')
  await app.close()
  await waitFor(async () => await connections() === 0, 3000, 'all closed').catch(() => {})
  t.equal(await connections(), 0)
})

t.test('regression: a devices: 1 relayed from node A after node B announced devices: 2 is dropped, not applied (presence out of order across nodes)', async t => {
  const { a, b, onA, onB, member } = await watchedNodes(t)

  // Hold node A's relays to the other nodes: B announces its newer state before A's older one arrives.
  const held: Array<() => void> = []
  const relay = a.app.erpSocket.toOtherNodes
  const send = relay as (...args: unknown[]) => void
  a.app.erpSocket.toOtherNodes = ((...args: unknown[]) => { held.push(() => send(...args)) }) as typeof relay
  const arrivedOnB: PresenceChanged[] = []
  b.app.io.on('erp:presence', ({ change }) => { arrivedOnB.push(change) })

  await connect(t, a.url, member.token)
  await waitFor(() => onA.about(member.id).length === 1, 5000, 'node A announces devices: 1')
  const laptop = await connect(t, b.url, member.token)
  await waitFor(() => onB.about(member.id).length === 1 && onA.about(member.id).length === 2, 5000, 'node B announces devices: 2, on both nodes')
  t.same(onB.about(member.id), [{ userId: member.id, status: 'online', devices: 2 }])
  t.equal(held.length, 1, 'node A’s devices: 1 is still on its way')

  a.app.erpSocket.toOtherNodes = relay
  held.shift()!()
  await waitFor(() => arrivedOnB.some(c => c.userId === member.id), 5000, 'the late devices: 1 reaches node B')
  const stale = arrivedOnB.find(c => c.userId === member.id)!
  t.match(stale, { status: 'online', devices: 1 })
  t.ok(stale.rev < onB.revs(member.id)[0]!, `it is older (rev ${stale.rev}) than what node B delivered (rev ${onB.revs(member.id)[0]})`)

  // A change made after it: a socket receives in order, so had the stale one been sent, it would come first.
  t.same(await request(laptop, 'presence:set', { status: 'away' }), { ok: true })
  await waitFor(() => onB.about(member.id).at(-1)?.status === 'away', 5000, 'away on node B')
  t.same(onB.about(member.id), [
    { userId: member.id, status: 'online', devices: 2 },
    { userId: member.id, status: 'away', devices: 2 }
  ], 'node B’s clients never saw devices: 1 after devices: 2')
  await waitFor(() => onA.about(member.id).at(-1)?.status === 'away', 5000, 'away on node A')
  t.same(onA.about(member.id).map(c => c.devices), [1, 2, 2], 'node A delivered its own devices: 1 first, in order')
  t.ok(increasing(onA.revs(member.id)) && increasing(onB.revs(member.id)))
  t.match(await entryOf(onB.socket, member.id), { status: 'away', devices: 2, rev: onB.revs(member.id).at(-1) })
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
  // Mutations keep their reply under an op key for 15 s (a re-sent script answers it): those expire.
  const keys = async () => {
    const all = await client.keys(`${prefix}:*`)
    const ops = all.filter(key => key.startsWith(`${prefix}:op:`))
    for (const op of ops) {
      const ttl = await client.pttl(op)
      if (ttl <= 0 || ttl > 15_000) t.fail(`op key ${op} expires in ${ttl} ms`)
    }
    return { ops: ops.length, others: all.filter(key => !ops.includes(key)).sort() }
  }
  const online = await keys()
  t.ok(online.ops >= 1, 'the connect kept its reply')
  t.same(online.others,
    [`${prefix}:epoch`, `${prefix}:expiry`, `${prefix}:rev:${company.id}`, `${prefix}:sockets:${company.id}`, `${prefix}:users:${company.id}`])

  member.disconnect()
  await waitFor(async () => (await app.presence.list(company.id)).length === 0, FAST.graceMs + 2000, 'offline')
  t.same((await keys()).others, [`${prefix}:epoch`, `${prefix}:rev:${company.id}`],
    'an empty company leaves only its revision counter (so revs keep growing when its users come back), and the store its epoch (and op keys, expiring)')

  await app.close()
  t.equal(await client.ping(), 'PONG', 'the caller’s client is still open')
  t.equal(client.listenerCount('error'), 0, 'the store removed its listeners')
})

t.test('redis store: every presence mutation takes a higher rev, also across offline and back', async t => {
  const prefix = redisPrefix(t)
  const store = new RedisPresenceStore({ redis: TEST_REDIS_URL, prefix })
  t.teardown(() => store.close())
  await storeRevisionsOnlyGrow(t, store, 'company-1')
  const companyOneRev = await store.redis.get(`${prefix}:rev:company-1`)
  const other = await store.connect({ companyId: 'company-2', userId: 'u-1', socketId: 's-2' }, 60_000)
  t.equal(await store.redis.get(`${prefix}:rev:company-2`), String(other.after.rev), 'each company counts its own revs')
  // Revs start at the store clock, so the two counters may hold the same number; what matters is
  // that company-2's mutation left company-1's counter alone.
  t.equal(await store.redis.get(`${prefix}:rev:company-1`), companyOneRev, 'another company’s mutation leaves this counter alone')

  // A counter lost while users are present (deleted by hand, or an eviction) never takes a rev backwards.
  await store.redis.del(`${prefix}:rev:company-2`)
  const busy = await store.set('company-2', 'u-1', { status: 'busy' })
  t.ok(busy!.after.rev > other.after.rev, `rev ${busy!.after.rev} after ${other.after.rev}`)
  const extra = await store.connect({ companyId: 'company-2', userId: 'u-1', socketId: 's-3' }, 60_000)
  t.ok(extra.after.rev > busy!.after.rev, 'and the counter carries on from there')

  // Entries written before revisions existed read as rev 0, and the next mutation gives them one.
  await store.redis.hset(`${prefix}:users:company-3`, 'u-1', JSON.stringify({ status: 'away', devices: 1, since: 1 }))
  t.match(await store.list('company-3'), [{ userId: 'u-1', status: 'away', rev: 0 }])
  t.ok(((await store.set('company-3', 'u-1', { status: 'online' }))?.after.rev ?? 0) > 0)
})

t.test('regression: after Redis lost its data, revs started again at 1 and every later change was dropped as stale', async t => {
  const prefix = redisPrefix(t)
  const store = new RedisPresenceStore({ redis: TEST_REDIS_URL, prefix })
  t.teardown(() => store.close())
  const phone = { companyId: 'company-1', userId: 'u-1', socketId: 'phone' }
  await store.connect(phone, 60_000)
  let last = 0
  for (const status of ['busy', 'away', 'online', 'busy'] as const) last = (await store.set('company-1', 'u-1', { status }))!.after.rev
  // The floor is the clock in ms: it stays ahead as long as a company averages less than one
  // mutation per ms (five in a row here ran a few revs ahead of it for a few ms).
  await sleep(20)
  // A restart without persistence (or a flush): every key is gone.
  await store.redis.del(await store.redis.keys(`${prefix}:*`))
  const again = await store.connect(phone, 60_000) // what the node's heartbeat does for a lost entry
  t.ok(again.after.rev > last, `the rev after the loss (${again.after.rev}) is above the last one given out before it (${last})`)
  const away = await store.set('company-1', 'u-1', { status: 'away' })
  t.ok(away!.after.rev > again.after.rev)
})

/** Sends a presence announcement to the other nodes as node `from` would. */
const relayFrom = (from: { app: FastifyInstance }, payload: unknown) =>
  (from.app.erpSocket.toOtherNodes as (event: string, payload: unknown) => void)('erp:presence', payload)

t.test('two nodes: relayed announcements that are not newer, or malformed, never reach clients', async t => {
  const { a, b } = await twoNodes(t, { ttlMs: 2000 })
  const company = await createCompany(a.app, ['admin', 'member', 'member'])
  const [, first, second] = company.users
  const onB = await watch(t, b.url, company.as('admin').token)
  const firstSocket = await connect(t, a.url, first!.token)
  await waitFor(() => onB.about(first!.id).length === 1, 5000, 'online relayed to node B')
  const online = onB.changes.find(c => c.userId === first!.id)!
  const at = new Date().toISOString()

  const warnings: unknown[] = []
  const warn = b.app.log.warn.bind(b.app.log)
  b.app.log.warn = ((...args: Parameters<typeof warn>) => { warnings.push(args[0]); return warn(...args) }) as typeof warn
  relayFrom(a, { companyId: company.id, change: { ...online, devices: 5, at } }) // the same rev again
  relayFrom(a, { companyId: company.id, change: { ...online, devices: 6, at, rev: online.rev - 1 } })
  relayFrom(a, { companyId: company.id, change: { ...online, rev: 'high' } })
  relayFrom(a, { companyId: 42, change: online })
  relayFrom(a, null)
  // A real change sent after them: on a socket it arrives after anything they had caused.
  t.same(await request(firstSocket, 'presence:set', { status: 'busy' }), { ok: true })
  await waitFor(() => onB.about(first!.id).length === 2, 5000, 'busy on node B')
  t.same(onB.about(first!.id), [
    { userId: first!.id, status: 'online', devices: 1 },
    { userId: first!.id, status: 'busy', devices: 1 }
  ], 'neither a repeated rev nor an older one was delivered')
  await waitFor(() => warnings.length >= 3, 5000, 'the malformed ones logged')
  t.equal(warnings.length, 3, 'each malformed announcement logged, none crashed the node')

  // Offline delivered: the node still remembers the rev for a while, so a late earlier state is dropped.
  firstSocket.disconnect()
  await waitFor(() => onB.about(first!.id).at(-1)?.status === 'offline', FAST.graceMs + 5000, 'offline on node B')
  relayFrom(a, { companyId: company.id, change: { ...online, status: 'busy', at, rev: onB.revs(first!.id).at(-1)! - 1 } })
  await connect(t, a.url, second!.token)
  await waitFor(() => onB.about(second!.id).length === 1, 5000, 'the next user online on node B')
  t.equal(onB.about(first!.id).at(-1)?.status, 'offline', 'a stale online after the offline was dropped')
  t.ok(increasing(onB.revs(first!.id)))
})

t.test('two nodes: a node remembers at most revCacheSize users, least recently announced forgotten first', async t => {
  const prefix = redisPrefix(t)
  const db = await testDatabase(t)
  const socket = { redis: TEST_REDIS_URL, redisPrefix: `${prefix}-adapter` }
  const a = await build(t, { db, realtime: { socket, presence: redisPresence(prefix) } })
  const b = await build(t, { db, realtime: { socket, presence: redisPresence(prefix, { revCacheSize: 1 }) } })
  const company = await createCompany(a.app, ['admin', 'member', 'member'])
  const [, first, second] = company.users
  const onB = await watch(t, b.url, company.as('admin').token)
  await connect(t, a.url, first!.token)
  await waitFor(() => onB.about(first!.id).length === 1, 5000, 'first online on node B')
  const online = onB.changes.find(c => c.userId === first!.id)!

  relayFrom(a, { companyId: company.id, change: { ...online, devices: 9 } })
  await connect(t, a.url, second!.token)
  await waitFor(() => onB.about(second!.id).length === 1, 5000, 'second online on node B')
  t.equal(onB.about(first!.id).length, 1, 'while remembered, a repeat of the first user’s rev is dropped')

  // The second user's announcement took the only slot: the first user's rev is forgotten, and a
  // repeat now passes (bounded memory; clients applying the rev rule still drop it themselves).
  relayFrom(a, { companyId: company.id, change: { ...online, devices: 9 } })
  await waitFor(() => onB.about(first!.id).length === 2, 5000, 'the repeat delivered')
  t.equal(onB.revs(first!.id)[1], online.rev, 'same rev: a client drops it as not newer')
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

t.test('regression: a presence Redis that stopped answering left presence acks and app.close() waiting', async t => {
  const redis = await dedicatedRedis(t)
  const prefix = redisPrefix(t)
  const { app, url } = await build(t, { realtime: { presence: { ...FAST, store: { redis: redis.url, prefix } } } })
  const company = await createCompany(app, ['admin', 'member'])
  const observer = await watch(t, url, company.as('admin').token)
  await waitFor(async () => (await list(observer.socket)).length === 1, 5000, 'listed')
  await redis.pause() // connection open, no replies
  t.teardown(() => redis.resume())
  const started = Date.now()
  t.match(await observer.socket.timeout(8000).emitWithAck('presence:set', { status: 'away' }), { ok: false, error: { code: 'SERVICE_UNAVAILABLE' } })
  // Two attempts of commandTimeout (2 s) each: a change is tried again under its op key.
  t.ok(Date.now() - started < 6000, `answered in ${Date.now() - started} ms`)
  const closing = Date.now()
  await app.close()
  t.ok(Date.now() - closing < 8000, `close resolved in ${Date.now() - closing} ms`)
})

// Regression (lifecycle review): close waited for the disconnected sockets' store updates without
// a bound, and a client passed in has no commandTimeout unless its owner set one.
t.test('regression: with a Redis client passed in and Redis no longer answering, app.close() waited forever', async t => {
  const redis = await dedicatedRedis(t)
  const prefix = redisPrefix(t)
  const client = new Redis(redis.url) // as the README builds Sentinel clients: no commandTimeout
  client.on('error', () => {})
  t.teardown(() => client.disconnect())
  const { app, url } = await build(t, { realtime: { presence: { ...FAST, store: { redis: client, prefix } } } })
  const company = await createCompany(app, ['admin'])
  const observer = await watch(t, url, company.as('admin').token)
  await waitFor(async () => (await list(observer.socket)).length === 1, 5000, 'listed')
  await redis.pause() // connection open, no replies
  t.teardown(() => redis.resume())
  const closing = Date.now()
  await app.close()
  t.ok(Date.now() - closing < 6000, `close resolved in ${Date.now() - closing} ms`)
})

// Regression (review of the shutdown change): closing a long-polling connection waited for the
// client's next poll, so its 'disconnect' came only when Socket.IO closed, after presence had
// stopped: the user stayed online in Redis until the socket's entry expired.
t.test('a node that closes records the departure of its long-polling sockets too', async t => {
  const prefix = redisPrefix(t)
  const { app, url } = await build(t, { realtime: { presence: redisPresence(prefix) } })
  const company = await createCompany(app, ['admin', 'member'])
  await connect(t, url, company.as('member').token, { transports: ['polling'] })
  await connect(t, url, company.as('admin').token)
  const redis = new Redis(TEST_REDIS_URL)
  t.teardown(() => redis.quit())
  await waitFor(async () => await redis.hlen(`${prefix}:sockets:${company.id}`) === 2, 5000, 'both sockets recorded')
  await app.close()
  t.equal(await redis.hlen(`${prefix}:sockets:${company.id}`), 0, 'both departures recorded before presence stopped')
})

/** What a Redis restart without persistence (or a flush) does to the store: every key is gone. */
async function loseStoreData (prefix: string): Promise<void> {
  const client = new Redis(TEST_REDIS_URL)
  try {
    const keys = await client.keys(`${prefix}:*`)
    if (keys.length > 0) await client.del(keys)
  } finally {
    await client.quit()
  }
}

/**
 * A member's last device leaves around a loss of the store's data, and must still be announced
 * offline (with growing revs). `prepare` runs once an observer is listed, before the member
 * connects, and returns the loss: `'before leaving'` (the heartbeat far away, so nothing
 * records the socket again before it leaves) or `'in grace'` (while its grace period runs).
 */
async function offlineAfterLoss (t: Test, when: 'before leaving' | 'in grace', prepare: (prefix: string) => Promise<() => Promise<void>>) {
  const prefix = redisPrefix(t)
  const presence = when === 'before leaving' ? redisPresence(prefix, { heartbeatMs: 30_000, ttlMs: 60_000 }) : redisPresence(prefix)
  const { app, url } = await build(t, { realtime: { presence } })
  const company = await createCompany(app, ['admin', 'member'])
  const member = company.as('member')
  const observer = await watch(t, url, company.as('admin').token)
  await waitFor(async () => (await list(observer.socket)).length === 1, 5000, 'the observer listed')
  const lose = await prepare(prefix)
  const socket = await connect(t, url, member.token)
  await waitFor(() => observer.about(member.id).length === 1, 5000, 'online')
  if (when === 'before leaving') await lose()
  socket.disconnect()
  if (when === 'in grace') {
    await sleep(FAST.graceMs / 4)
    await lose()
  }
  await waitFor(() => observer.about(member.id).some(change => change.status === 'offline'), FAST.graceMs + 3000, 'offline')
  t.match(observer.about(member.id).at(-1), { status: 'offline', devices: 0 })
  t.ok(increasing(observer.revs(member.id)))
}

const dataLoss = async (prefix: string) => () => loseStoreData(prefix)

t.test('regression: a grace period running when Redis lost its data never ended: the user stayed online', t => offlineAfterLoss(t, 'in grace', dataLoss))

t.test('regression: a last device that left after Redis lost its data, before the next heartbeat, was never announced offline', t => offlineAfterLoss(t, 'before leaving', dataLoss))

t.test('without a data loss, a grace period or a socket another node’s sweep ended gives its own node no second offline', async t => {
  // The loss checks must not turn the usual races (a sweep ending the grace period, or claiming
  // the socket of a stalled node, first) into a second offline.
  const prefix = redisPrefix(t)
  const store = new RedisPresenceStore({ redis: TEST_REDIS_URL, prefix })
  t.teardown(() => store.close())
  const ref = { companyId: 'company-1', userId: 'u-1', socketId: 's-1' }
  const { epoch } = await store.connect(ref, 60_000)
  t.type(epoch, 'string')
  const departure = await store.disconnect(ref, 20, epoch)
  const graceUntil = departure && departure.after !== null ? departure.graceUntil : undefined
  t.type(graceUntil, 'number')
  // A stalled node's socket: its entry expires before the node heartbeats or sees it leave.
  const stalled = { companyId: 'company-1', userId: 'u-2', socketId: 's-2' }
  const { epoch: stalledEpoch } = await store.connect(stalled, 20)
  await sleep(40)
  const swept = await store.sweep(10)
  t.match(swept.sort((x, y) => x.userId.localeCompare(y.userId)), [
    { companyId: 'company-1', userId: 'u-1', after: null },
    { companyId: 'company-1', userId: 'u-2', after: null }
  ], 'the sweep ends the grace period and claims the expired socket')
  t.equal(await store.endGrace('company-1', 'u-1', graceUntil!, epoch), null, 'the node that started the grace period announces nothing')
  t.equal(await store.disconnect(stalled, 20, stalledEpoch), null, 'nor does the stalled node when its socket leaves')
})

/**
 * What a failover to a lagging replica, or a restart from an older snapshot, does to the store:
 * it is back as it was when `snapshot` was taken, epoch included. Returns the roll-back.
 */
async function snapshotStore (prefix: string): Promise<() => Promise<void>> {
  const client = new Redis(TEST_REDIS_URL)
  const keys = await client.keys(`${prefix}:*`)
  const copies = await Promise.all(keys.map(async key => ({ key, dump: (await client.dumpBuffer(key))!, ttl: Math.max(0, await client.pttl(key)) })))
  // In one script: the app keeps writing meanwhile, and a key it wrote between a listing and a
  // restore made RESTORE fail (BUSYKEY).
  const ROLL_BACK = `for _, key in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', key) end
for i = 2, #ARGV, 3 do redis.call('RESTORE', ARGV[i], ARGV[i + 1], ARGV[i + 2]) end`
  return async () => {
    try {
      await client.eval(ROLL_BACK, 0, `${prefix}:*`, ...copies.flatMap(({ key, dump, ttl }) => [key, ttl, dump]))
    } finally {
      await client.quit()
    }
  }
}

// The copy knows the observer, not the member.
t.test('regression: a last device that left after Redis rolled back to an older copy (same epoch), before the next heartbeat, was never announced offline', t => offlineAfterLoss(t, 'before leaving', snapshotStore))

t.test('regression: a grace period running when Redis rolled back to an older copy (same epoch) never ended: the user stayed online', t => offlineAfterLoss(t, 'in grace', snapshotStore))

// Regression (review): the sweep sent its claims together and awaited them with Promise.all, so
// one failed claim (a command timeout, a script error) rejected the whole batch, and the offlines
// of the claims that had succeeded (their entries already removed from Redis) were never announced.
t.test('a sweep whose claims partly fail still announces the ones that succeeded', async t => {
  const prefix = redisPrefix(t)
  // The Redis store, except that its sweep reports one more claim as failed (its own claims, on
  // the real Redis, are what it hands back as claimed).
  const redisStore = new RedisPresenceStore({ redis: TEST_REDIS_URL, prefix })
  const store: PresenceStore = Object.assign(Object.create(redisStore) as RedisPresenceStore, {
    sweep: async (limit: number) => {
      throw new PartialSweepError([new Error('another claim failed (test)')], await redisStore.sweep(limit))
    }
  })
  t.teardown(() => redisStore.close())
  const { app, url } = await build(t, { realtime: { presence: { ...FAST, store, sweepIntervalMs: 60_000, heartbeatMs: 60_000, ttlMs: 120_000 } } })
  const company = await createCompany(app, ['admin', 'member'])
  const member = company.as('member')
  const observer = await watch(t, url, company.as('admin').token)
  // A crashed socket (recorded, never heartbeated).
  await redisStore.connect({ companyId: company.id, userId: member.id, socketId: 'crashed-1' }, 20)
  await sleep(60)
  const err = await app.presence.sweep().catch((e: unknown) => e)
  t.type(err, PartialSweepError, 'the failure is still reported')
  await waitFor(() => observer.about(member.id).length === 1, 5000, 'the offline of the claim that succeeded')
  t.same(observer.about(member.id), [{ userId: member.id, status: 'offline', devices: 0 }])
})

/** A TCP proxy to the test Redis that can lose a reply with its connection (the client then reconnects) or hold one back. */
async function flakyRedisProxy (t: TestLike) {
  const target = new URL(TEST_REDIS_URL)
  let lose = 0 // lose the lose-th reply from now (0: none)
  let delay = 0 // hold the delay-th reply from now back by delayMs (0: none); later replies wait behind it
  let delayMs = 0
  const pairs = new Set<net.Socket>()
  const server = net.createServer(client => {
    const upstream = net.connect(Number(target.port || 6379), target.hostname)
    pairs.add(client).add(upstream)
    client.on('data', chunk => upstream.write(chunk))
    let writes: Promise<unknown> = Promise.resolve()
    upstream.on('data', chunk => {
      if (delay > 0 && --delay === 0) {
        const ms = delayMs
        writes = writes.then(() => sleep(ms))
      }
      if (lose === 0 || --lose > 0) {
        writes = writes.then(() => { if (!client.destroyed) client.write(chunk) })
        return
      }
      // Redis ran the command; its reply goes nowhere and the connection drops.
      client.destroy()
      upstream.destroy()
    })
    const close = () => { client.destroy(); upstream.destroy() }
    client.on('close', close).on('error', close)
    upstream.on('close', close).on('error', close)
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => {
    for (const socket of pairs) socket.destroy()
    return new Promise(resolve => server.close(resolve))
  })
  return {
    url: `redis://127.0.0.1:${(server.address() as net.AddressInfo).port}`,
    loseReply: (nth = 1) => { lose = nth },
    delayReply: (nth: number, ms: number) => { delay = nth; delayMs = ms }
  }
}

// Regression (review): ioredis re-sends a command whose reply was lost with its connection, and a
// presence script run a second time found its own work done: the first device of a user came back
// as "already connected" (no online announced), an expired socket as "already gone" (no offline).
t.test('redis store: a script whose reply was lost and that ioredis re-sends answers its first reply', async t => {
  const prefix = redisPrefix(t)
  const proxy = await flakyRedisProxy(t)
  const store = new RedisPresenceStore({ redis: proxy.url, prefix })
  t.teardown(() => store.close())
  // Loads the scripts (NOSCRIPT → EVAL), so the lost reply below is the EVALSHA's own.
  await store.connect({ companyId: 'company-1', userId: 'u-0', socketId: 's-0' }, 60_000)

  proxy.loseReply()
  const first = await store.connect({ companyId: 'company-1', userId: 'u-1', socketId: 's-1' }, 20)
  t.equal(first.before, null, 'the re-sent connect still says the user was offline before')
  t.match(first.after, { devices: 1 })

  await sleep(60)
  // The sweep reads what is due, then claims it: the claim's reply is the one lost.
  proxy.loseReply(2)
  const swept = await store.sweep(10)
  t.match(swept, [{ companyId: 'company-1', userId: 'u-1', after: null }], 'the expired socket is still claimed as an offline')

  await store.connect({ companyId: 'company-1', userId: 'u-2', socketId: 's-2' }, 60_000)
  proxy.loseReply()
  const departure = await store.disconnect({ companyId: 'company-1', userId: 'u-2', socketId: 's-2' }, 60_000)
  t.match(departure, { after: { devices: 0 } }, 'the re-sent disconnect still reports the last device leaving')
})

/** A Redis store (300 ms command timeout) whose connection goes through a flakyRedisProxy. */
async function storeBehindProxy (t: TestLike, prefix: string) {
  const proxy = await flakyRedisProxy(t)
  const store = new RedisPresenceStore({ redis: proxy.url, prefix, redisOptions: { commandTimeout: 300 } })
  t.teardown(() => store.close())
  return { proxy, store }
}

// Regression (review): a claim whose reply came after commandTimeout had already removed its
// entry; the sweep reported it failed and nobody announced that offline, ever.
t.test('redis store: a sweep claim whose reply comes too late is tried again and still announced', async t => {
  const prefix = redisPrefix(t)
  const { proxy, store } = await storeBehindProxy(t, prefix)
  await store.connect({ companyId: 'company-1', userId: 'u-0', socketId: 's-0' }, 60_000)
  await store.connect({ companyId: 'company-1', userId: 'u-1', socketId: 's-1' }, 20)
  await sleep(60)
  // The sweep reads what is due, then claims it: the claim's reply arrives 450 ms late, after
  // its commandTimeout (300 ms), and the retry's (sent at 350 ms, queued behind it) well before
  // the retry's own (650 ms). With 600 ms the margin was 50 ms, and a loaded CI machine missed it.
  proxy.delayReply(2, 450)
  const swept = await store.sweep(10)
  t.match(swept, [{ companyId: 'company-1', userId: 'u-1', after: null }], 'claimed once, announced')
  t.same((await store.list('company-1')).map(entry => entry.userId), ['u-0'])
})

// Regression (presence review): only the sweep's claims were tried again. A grace period whose end
// replied after commandTimeout had ended in Redis (entry and user gone, nothing left for a sweep),
// but its node announced no offline: every client showed the user online for good. A connect
// announced no online, and a status change nothing (its retry found nothing to change).
t.test('redis store: a connect, status change, departure or grace end whose reply comes too late is tried again and reports its change', async t => {
  const prefix = redisPrefix(t)
  const { proxy, store } = await storeBehindProxy(t, prefix)
  // Loads every script (NOSCRIPT → EVAL), so each delayed reply below is the script's own.
  const warm = { companyId: 'company-1', userId: 'u-0', socketId: 's-0' }
  await store.connect(warm, 60_000)
  await store.set('company-1', 'u-0', { status: 'away' })
  const graceUntil = (departure: Departure | null) => (departure as { graceUntil: number }).graceUntil
  await store.endGrace('company-1', 'u-0', graceUntil(await store.disconnect(warm, 60_000)))

  const ref = { companyId: 'company-1', userId: 'u-1', socketId: 's-1' }
  proxy.delayReply(1, 450)
  const connected = await store.connect(ref, 60_000)
  t.equal(connected.before, null, 'connect: the user was offline before')
  t.match(connected.after, { status: 'online', devices: 1 })
  proxy.delayReply(1, 450)
  t.match(await store.set('company-1', 'u-1', { status: 'busy' }), { before: { status: 'online' }, after: { status: 'busy' } }, 'set: the change')
  proxy.delayReply(1, 450)
  const left = await store.disconnect(ref, 60_000)
  t.match(left, { after: { devices: 0 } }, 'disconnect: the last device left')
  proxy.delayReply(1, 450)
  const ended = await store.endGrace('company-1', 'u-1', graceUntil(left))
  t.ok(ended && ended.rev > 0, 'endGrace: the offline to announce')
  t.same(await store.list('company-1'), [], 'nobody left online')
  await sleep(500) // the late replies drain before close
})

t.test('redis store: a claim that fails twice rejects the sweep with a PartialSweepError', async t => {
  const prefix = redisPrefix(t)
  const { proxy, store } = await storeBehindProxy(t, prefix)
  await store.connect({ companyId: 'company-1', userId: 'u-1', socketId: 's-1' }, 20)
  await sleep(60)
  // The claim's reply comes 2 s late: the claim and its retry (queued behind it) both time out.
  proxy.delayReply(2, 2000)
  const err = await store.sweep(10).catch((e: unknown) => e)
  t.type(err, PartialSweepError)
  t.same((err as PartialSweepError).claimed, [])
  t.match((err as PartialSweepError).errors, [/timed out/i])
  await sleep(2000) // the late replies drain before close
})

// Regression (review of the claim retry): a claim whose script failed part-way was retried under
// the same op key, found its first writes done, and claimed nothing: the error vanished.
t.test('redis store: a claim whose script fails part-way is reported, not retried into "nothing to claim"', async t => {
  const prefix = redisPrefix(t)
  const store = new RedisPresenceStore({ redis: TEST_REDIS_URL, prefix })
  t.teardown(() => store.close())
  await store.connect({ companyId: 'company-1', userId: 'u-1', socketId: 's-1' }, 20)
  await store.connect({ companyId: 'company-1', userId: 'u-2', socketId: 's-2' }, 20)
  // u-2's entry lacks its devices count: its claim fails after removing the socket's expiry.
  await store.redis.hset(`${prefix}:users:company-1`, 'u-2', JSON.stringify({ status: 'online', since: 1 }))
  await sleep(60)
  const err = await store.sweep(10).catch((e: unknown) => e)
  t.type(err, PartialSweepError)
  t.match((err as PartialSweepError).claimed, [{ companyId: 'company-1', userId: 'u-1', after: null }], 'the healthy claim is kept')
  t.match((err as PartialSweepError).errors, [/devices/])
})
