import type { Socket as NetSocket } from 'node:net'
import Fastify from 'fastify'
import fp from 'fastify-plugin'
import t from 'tap'
import erpPresence, { MemoryPresenceStore, type ErpPresenceOptions, type PresenceStore } from '../plugins/presence/index.ts'
import erpSocket from '../plugins/socket/index.ts'
import { build, connect, createCompany, record, request, sleep, spyOnWrites, testDatabase, waitFor } from './helpers.ts'
import {
  badPayloadsChangeNothing, companiesStayApart, entryOf, FAST, increasing, list, reconnectInsideGrace, storeRevisionsOnlyGrow,
  twoDevicesThenGrace, watch
} from './presence-scenarios.ts'

t.test('memory store: every presence mutation takes a higher rev, also across offline and back', async t => {
  const store = new MemoryPresenceStore()
  await storeRevisionsOnlyGrow(t, store, 'company-1')
  const before = Date.now()
  const other = await store.connect({ companyId: 'company-2', userId: 'u-1', socketId: 's-2' }, 60_000)
  t.ok(other.after.rev >= before && other.after.rev <= Date.now(), 'a company\'s first rev is the clock in ms (nothing about another company shows in it)')
})

t.test('memory store: two devices of one user, then the grace period', async t => {
  const { app, url } = await build(t, { realtime: { presence: FAST } })
  t.equal(app.presence.store.kind, 'memory', 'memory is the default store')
  await twoDevicesThenGrace(t, url, await createCompany(app, ['admin', 'member']), FAST.graceMs)
})

t.test('memory store: a reconnect inside the grace period announces nothing', async t => {
  const { app, url } = await build(t, { realtime: { presence: FAST } })
  await reconnectInsideGrace(t, url, await createCompany(app, ['admin', 'member']), FAST.graceMs)
})

t.test('memory store: no presence event or list entry crosses companies', async t => {
  const { app, url } = await build(t, { realtime: { presence: FAST } })
  const acme = await createCompany(app, ['admin', 'member'])
  const globex = await createCompany(app, ['admin', 'member'])
  await companiesStayApart(t, [url, url], acme, globex)
})

t.test('memory store: bad presence:set payloads are refused and change nothing', async t => {
  const { app, url } = await build(t, { realtime: { presence: FAST } })
  await badPayloadsChangeNothing(t, url, await createCompany(app, ['admin', 'member']))
})

t.test('presence:set announces status and viewing changes only, and keeps since for viewing changes', async t => {
  const { app, url } = await build(t, { realtime: { presence: FAST } })
  const company = await createCompany(app, ['admin', 'member'])
  const observer = await watch(t, url, company.as('admin').token)
  const subject = company.as('member')
  const socket = await connect(t, url, subject.token)
  await waitFor(() => observer.about(subject.id).length === 1, 5000, 'online')
  const online = await entryOf(observer.socket, subject.id)

  t.same(await request(socket, 'presence:set', { status: 'online', viewing: { type: 'project', id: 'p-1' } }), { ok: true })
  await waitFor(() => observer.about(subject.id).length === 2, 5000, 'viewing')
  t.same(observer.about(subject.id)[1], { userId: subject.id, status: 'online', devices: 1, viewing: { type: 'project', id: 'p-1' } })
  t.equal((await entryOf(observer.socket, subject.id))?.since, online?.since, 'a viewing change keeps since')

  t.same(await request(socket, 'presence:set', { status: 'online', viewing: { type: 'project', id: 'p-1' } }), { ok: true }, 'a repeat is acked')
  await sleep(10)
  t.same(await request(socket, 'presence:set', { status: 'busy' }), { ok: true })
  await waitFor(() => observer.about(subject.id).length === 3, 5000, 'busy')
  t.same(observer.about(subject.id)[2], { userId: subject.id, status: 'busy', devices: 1, viewing: { type: 'project', id: 'p-1' } },
    'the repeat announced nothing; an omitted viewing is kept')
  const busy = await entryOf(observer.socket, subject.id)
  t.not(busy?.since, online?.since, 'a status change moves since')

  t.same(await request(socket, 'presence:set', { status: 'busy', viewing: null }), { ok: true })
  await waitFor(() => observer.about(subject.id).length === 4, 5000, 'viewing cleared')
  t.same(observer.about(subject.id)[3], { userId: subject.id, status: 'busy', devices: 1 }, 'viewing: null clears it')
  t.same(await entryOf(observer.socket, subject.id), { userId: subject.id, status: 'busy', devices: 1, since: busy?.since, rev: observer.revs(subject.id)[3] })

  // A presence:set without an ack callback still applies.
  socket.emit('presence:set', { status: 'away' })
  await waitFor(() => observer.about(subject.id).length === 5, 5000, 'away')
  t.equal(observer.about(subject.id)[4]?.status, 'away')
  t.ok(increasing(observer.revs(subject.id)), `revs only go up: ${observer.revs(subject.id).join(', ')}`)
  t.same(await app.presence.list(company.id), await list(observer.socket), 'fastify.presence.list matches presence:list')
})

t.test('a login storm reaches each client in one write per batch window, every change in order', async t => {
  // A window far longer than the logins take, so the five arrivals surely share it.
  const { app, url } = await build(t, { realtime: { presence: { ...FAST, batchMs: 1000 } } })
  const company = await createCompany(app, ['admin', 'member', 'member', 'member', 'member', 'member'])
  const observer = await watch(t, url, company.users[0]!.token)
  await sleep(1100) // the observer's own online has gone out
  // The server end of the observer's connection (engine.io's WebSocket transport keeps it as `socket._socket`).
  const conn = app.io.of('/').sockets.get(observer.socket.id!)!.conn as unknown as { transport: { socket: { _socket: NetSocket } } }
  const writes = spyOnWrites(conn.transport.socket._socket)
  const arrivals = company.users.slice(1)
  await Promise.all(arrivals.map(user => connect(t, url, user.token)))
  await waitFor(() => arrivals.every(user => observer.about(user.id).length === 1), 5000, 'five arrivals')
  t.same(writes, [5], 'five presence:changed broadcast frames (one chunk each) in one write')
  t.ok(increasing(observer.changes.filter(c => arrivals.some(u => u.id === c.userId)).map(c => c.rev)), 'in rev order')
})

t.test('a batch window sends a newcomer the changes after it joined, not the ones before', async t => {
  const { app, url } = await build(t, { realtime: { presence: { ...FAST, batchMs: 1000 } } })
  const company = await createCompany(app, ['admin', 'member', 'member'])
  const [first, second, third] = company.users
  const observer = await watch(t, url, first!.token)
  await sleep(1100) // the observer's own online has gone out; the next arrival opens a window
  const early = await connect(t, url, second!.token)
  const earlySeen = record(early)
  // The early arrival's change is waiting in the window before the late one connects.
  await waitFor(async () => (await app.presence.list(company.id)).some(u => u.userId === second!.id), 5000, 'the early arrival recorded')
  await sleep(20)
  const late = await connect(t, url, third!.token)
  const lateSeen = record(late)
  await waitFor(() => observer.about(third!.id).length === 1, 5000, 'the late arrival')

  const arrivals = (seen: typeof earlySeen) => seen.filter(e => e.event === 'presence:changed').map(e => e.payload.userId)
  t.same(observer.changes.filter(c => c.userId !== first!.id).map(c => c.userId), [second!.id, third!.id], 'a member from before the window gets both')
  t.same(arrivals(earlySeen), [second!.id, third!.id], 'the early arrival gets its own and the later one')
  t.same(arrivals(lateSeen), [third!.id], 'the late arrival gets only what happened after it joined')
  t.same((await list(late)).map(u => u.userId).sort(), [first!.id, second!.id, third!.id].sort(), 'presence:list tells it the rest')
})

t.test('batchMs 0 sends each change at once: a presence:set’s change reaches the setter before its ack', async t => {
  for (const batchMs of [0, 300]) {
    const { app, url } = await build(t, { realtime: { presence: { ...FAST, batchMs } } })
    const company = await createCompany(app, ['admin'])
    const socket = await connect(t, url, company.users[0]!.token)
    await waitFor(async () => (await entryOf(socket, company.users[0]!.id)) !== undefined, 5000, 'own entry')
    await sleep(batchMs + 50) // its own online has been delivered, with or without a window
    const seen = record(socket)
    t.same(await request(socket, 'presence:set', { status: 'busy' }), { ok: true })
    const busyAtAck = seen.filter(e => e.event === 'presence:changed' && e.payload.status === 'busy').length
    t.equal(busyAtAck, batchMs === 0 ? 1 : 0, `batchMs ${batchMs}: ${batchMs === 0 ? 'sent before the ack' : 'held until the window ends'}`)
    await waitFor(() => seen.length === 1, 5000, 'busy')
    t.equal(seen[0]!.payload.status, 'busy')
  }
})

t.test('entries of a node that stops without cleanup expire within the TTL on the node that survives', async t => {
  // Two app instances sharing one in-process store stand in for two nodes sharing Redis.
  const store = new MemoryPresenceStore()
  const db = await testDatabase(t)
  const presence = { ...FAST, store }
  const survivor = await build(t, { db, realtime: { presence } })
  const doomed = await build(t, { db, realtime: { presence } })
  const company = await createCompany(survivor.app, ['admin', 'member', 'member'])
  const [, first, second] = company.users
  const observer = await watch(t, survivor.url, company.as('admin').token)
  await connect(t, doomed.url, first!.token)
  await connect(t, doomed.url, first!.token)
  await connect(t, doomed.url, second!.token)
  await waitFor(async () => (await list(observer.socket)).length === 3, 5000, 'three users listed')
  t.match(await entryOf(observer.socket, first!.id), { devices: 2 })

  // One heartbeat gives the two sockets of `first` the same deadline. Without it, when no
  // heartbeat ran after the second connected, their deadlines differ by the connects' gap and
  // a sweep can fall between them: `devices: 1`, then offline, and the wait below never ended.
  await doomed.app.presence.heartbeat()
  const died = Date.now()
  doomed.app.presence.abandon()
  await doomed.app.close()
  await waitFor(() => observer.about(first!.id).length === 1 && observer.about(second!.id).length === 1,
    FAST.ttlMs + FAST.sweepIntervalMs + 2000, 'offline for both users of the dead node')
  const elapsed = Date.now() - died
  t.same(observer.about(first!.id), [{ userId: first!.id, status: 'offline', devices: 0 }], 'one offline event for the user with two dead sockets')
  t.same(observer.about(second!.id), [{ userId: second!.id, status: 'offline', devices: 0 }])
  t.ok(elapsed <= FAST.ttlMs + FAST.sweepIntervalMs + 500, `offline announced ${elapsed} ms after the node died (ttl ${FAST.ttlMs} ms)`)
  t.same((await list(observer.socket)).map(u => u.userId), [company.as('admin').id], 'only the survivor’s user is left')
})

t.test('a node whose entries were swept while it was stalled re-announces its users', async t => {
  // A clock the test moves: the node "stalls" past the TTL without timers firing.
  let offset = 0
  const store = new MemoryPresenceStore(() => Date.now() + offset)
  const slow = { heartbeatMs: 60_000, ttlMs: 120_000, sweepIntervalMs: 60_000 }
  const { app, url } = await build(t, { realtime: { presence: { ...FAST, ...slow, store } } })
  const company = await createCompany(app, ['admin', 'member'])
  const observer = await watch(t, url, company.as('admin').token)
  const subject = company.as('member')
  const socket = await connect(t, url, subject.token)
  await waitFor(() => observer.about(subject.id).length === 1, 5000, 'online')

  await app.presence.heartbeat()
  t.equal(await app.presence.sweep(), 0, 'a heartbeat keeps entries alive')

  offset = 130_000
  t.equal(await app.presence.sweep(), 2, 'both sockets’ entries expired')
  await waitFor(() => observer.about(subject.id).length === 2, 5000, 'offline after expiry')
  t.same(observer.about(subject.id)[1], { userId: subject.id, status: 'offline', devices: 0 })

  await app.presence.heartbeat()
  await waitFor(() => observer.about(subject.id).length === 3, 5000, 'online again after the heartbeat')
  t.same(observer.about(subject.id)[2], { userId: subject.id, status: 'online', devices: 1 }, 'the heartbeat re-added the live socket')

  offset = 260_000
  await app.presence.sweep()
  await waitFor(() => observer.about(subject.id).length === 4, 5000, 'offline again')
  // presence:set from a socket whose entry is gone re-adds it before applying the change.
  t.same(await request(socket, 'presence:set', { status: 'busy' }), { ok: true })
  await waitFor(() => observer.about(subject.id).length === 6, 5000, 'online, then busy')
  t.same(observer.about(subject.id).slice(4), [
    { userId: subject.id, status: 'online', devices: 1 },
    { userId: subject.id, status: 'busy', devices: 1 }
  ])
})

t.test('a failing store answers SERVICE_UNAVAILABLE and never crashes the node', async t => {
  const memory = new MemoryPresenceStore()
  let broken = false
  const fail = <T>(fn: () => Promise<T>) => () => broken ? Promise.reject(new Error('store down')) : fn()
  const store: PresenceStore = {
    kind: 'memory',
    connect: (ref, ttl) => fail(() => memory.connect(ref, ttl))(),
    disconnect: (ref, grace) => fail(() => memory.disconnect(ref, grace))(),
    set: (c, u, change) => fail(() => memory.set(c, u, change))(),
    endGrace: (c, u, until) => fail(() => memory.endGrace(c, u, until))(),
    refresh: (refs, ttl) => fail(() => memory.refresh(refs, ttl))(),
    sweep: limit => fail(() => memory.sweep(limit))(),
    list: c => fail(() => memory.list(c))(),
    close: async () => { throw new Error('a store passed in must not be closed by the plugin') }
  }
  const { app, url } = await build(t, { realtime: { presence: { ...FAST, store } } })
  const company = await createCompany(app, ['admin', 'member'])
  const observer = await watch(t, url, company.as('admin').token)
  const member = await connect(t, url, company.as('member').token)
  await waitFor(() => observer.about(company.as('member').id).length === 1, 5000, 'online')

  broken = true
  const set = await request(member, 'presence:set', { status: 'away' })
  t.same(set, { ok: false, error: { code: 'SERVICE_UNAVAILABLE', message: 'Presence is unavailable; try again' } })
  const listed = await request(observer.socket, 'presence:list')
  t.equal(listed.error?.code, 'SERVICE_UNAVAILABLE')
  const late = await connect(t, url, company.as('member').token)
  late.disconnect()
  member.disconnect()
  await sleep(FAST.sweepIntervalMs * 3) // heartbeat and sweep fail meanwhile

  broken = false
  // The store missed the member's disconnect: its entry, no longer refreshed, expires instead.
  await waitFor(() => observer.about(company.as('member').id).length === 2, FAST.ttlMs + 2000, 'offline through expiry')
  t.same(observer.about(company.as('member').id)[1], { userId: company.as('member').id, status: 'offline', devices: 0 })
  t.same((await list(observer.socket)).map(u => u.userId), [company.as('admin').id], 'the node serves again once the store is back')
  t.ok(observer.socket.connected)
})

t.test('a store with a user missing from set answers SERVICE_UNAVAILABLE', async t => {
  const memory = new MemoryPresenceStore()
  const store: PresenceStore = Object.assign(Object.create(memory) as MemoryPresenceStore, { set: async () => null })
  const { app, url } = await build(t, { realtime: { presence: { ...FAST, store } } })
  const company = await createCompany(app, ['member'])
  const socket = await connect(t, url, company.as('member').token)
  const answer = await request(socket, 'presence:set', { status: 'away' })
  t.equal(answer.error?.code, 'SERVICE_UNAVAILABLE')
})

t.test('closing a node stops its timers and leaves its users’ grace periods in the store', async t => {
  const store = new MemoryPresenceStore()
  const { app, url } = await build(t, { realtime: { presence: { ...FAST, store } } })
  const company = await createCompany(app, ['member'])
  await connect(t, url, company.as('member').token)
  await waitFor(async () => (await store.list(company.id)).length === 1, 5000, 'listed')
  await app.close()
  t.match(await store.list(company.id), [{ userId: company.as('member').id, devices: 0 }], 'in its grace period, for another node to end')
  await sleep(FAST.graceMs + 100)
  t.equal((await store.list(company.id)).length, 1, 'the closed node ended nothing itself')
  t.equal((await store.sweep(100)).length, 1, 'a surviving node’s sweep ends it')
})

t.test('invalid options are refused at registration with the option named', async t => {
  const cases: Array<[ErpPresenceOptions, RegExp]> = [
    [{ ttlMs: 100, heartbeatMs: 100 }, /invalid option ttlMs: must be at least twice heartbeatMs/],
    [{ graceMs: -1 }, /invalid option graceMs/],
    [{ store: 'redis' as 'memory' }, /invalid option store/],
    [{ store: { redis: 'http://127.0.0.1:6379' } }, /invalid option store/],
    [{ store: { redis: 'redis://127.0.0.1:6379', unknown: 1 } as never }, /invalid option store/],
    [{ sweepBatchSize: 0 }, /invalid option sweepBatchSize/],
    [{ batchMs: -1 }, /invalid option batchMs/]
  ]
  for (const [options, message] of cases) {
    const app = Fastify()
    const boot = async () => {
      await app.register(erpSocket)
      await app.register(fp(async () => {}, { name: 'erp-auth' }))
      await app.register(erpPresence, options)
      await app.ready()
    }
    await t.rejects(boot(), message, JSON.stringify(options))
    await app.close().catch(() => {})
  }
})

// Regression (presence and auth review): presence:set calls of one socket queued without bound
// behind a slow store (a promise chain per socket, each a store write to come).
t.test('a socket with 8 presence:set calls waiting for the store gets RATE_LIMITED for more; the waiting ones complete', async t => {
  let open!: () => void
  const gate = new Promise<void>(resolve => { open = resolve })
  class SlowStore extends MemoryPresenceStore {
    override async set (...args: Parameters<MemoryPresenceStore['set']>) {
      await gate
      return await super.set(...args)
    }
  }
  const { app, url } = await build(t, { realtime: { presence: { ...FAST, store: new SlowStore() } } })
  const member = (await createCompany(app, ['member'])).as('member')
  const socket = await connect(t, url, member.token)
  const statuses = ['away', 'busy', 'online'] as const
  const acks = Array.from({ length: 10 }, (_, i) => request(socket, 'presence:set', { status: statuses[i % 3] }))
  const refused = await Promise.all(acks.slice(8))
  t.same(refused.map(ack => ack.error?.code), ['RATE_LIMITED', 'RATE_LIMITED'], 'the 9th and 10th are refused at once')
  open()
  t.same(await Promise.all(acks.slice(0, 8)), Array(8).fill({ ok: true }), 'the first 8 complete')
  t.same(await request(socket, 'presence:set', { status: 'away' }), { ok: true }, 'and the next is taken again')
})

// Regression (review of the grace retry): a grace end that failed retried its old deadline even
// when the user had come back and left again on this node meanwhile; the retry cleared the newer
// grace period's timer, and only a sweep (sweepIntervalMs later) ended it.
t.test('a failed grace end of an earlier grace period does not cancel the timer of a newer one', async t => {
  let calls = 0
  let open!: () => void
  const gate = new Promise<void>(resolve => { open = resolve })
  class SlowFirstEnd extends MemoryPresenceStore {
    override async endGrace (...args: Parameters<MemoryPresenceStore['endGrace']>) {
      if (++calls === 1) {
        await gate
        throw new Error('the first grace end fails (test)')
      }
      return await super.endGrace(...args)
    }
  }
  // No sweep in this test's time: only the grace timers end grace periods.
  const { app, url } = await build(t, { realtime: { presence: { ...FAST, sweepIntervalMs: 60_000, store: new SlowFirstEnd() } } })
  const company = await createCompany(app, ['admin', 'member'])
  const member = company.as('member')
  const watcher = await watch(t, url, company.as('admin').token)
  const phone = await connect(t, url, member.token)
  phone.disconnect()
  await waitFor(() => calls === 1, 3000, 'the first grace end under way')
  const laptop = await connect(t, url, member.token)
  await sleep(100)
  laptop.disconnect()
  await sleep(100)
  open()
  await waitFor(() => watcher.about(member.id).some(change => change.status === 'offline'), 3000, 'the newer grace period ends on its own timer')
  t.match(watcher.about(member.id).at(-1), { status: 'offline', devices: 0 }, 'the last change is the offline')
  t.equal(calls, 2, 'the newer period\'s end, and no retry of the old one')
})
