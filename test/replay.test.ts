import t from 'tap'
import { randomUUID } from 'node:crypto'
import type { Socket as ClientSocket } from 'socket.io-client'
import { dedicatedRedis } from './cluster-helpers.ts'
import { authHeader, build, connect, createCompany, dropRedisPrefix, nextEvent, request, sleep, TEST_REDIS_URL, testDatabase, uniqueName, waitFor, type TestCompany } from './helpers.ts'
import type { FastifyInstance } from 'fastify'

const companyOf = (c: TestCompany) => `company:${c.id}` as const
const userOf = (u: { id: string }) => `user:${u.id}` as const

/** Publishes a notification to a user's stream and a project event to the company stream. */
async function publishBoth (app: FastifyInstance, company: TestCompany, n: number) {
  const admin = company.as('admin')
  for (let i = 0; i < n; i++) {
    await app.eventLog.transaction(async (_tx, publish) => {
      await publish({ stream: `company:${company.id}`, type: 'project:deleted', companyId: company.id, actorId: admin.id, data: { projectId: `p${i}` } })
      await publish({ stream: `user:${company.as('member').id}`, type: 'notification:new', companyId: company.id, actorId: admin.id, data: { kind: 'test', message: `n${i}` } })
    })
  }
}

/** seqs received per stream, in arrival order (domain events only). */
function seqsByStream (seen: Array<{ event: string, payload: any }>) {
  const out: Record<string, number[]> = {}
  for (const { payload } of seen) {
    if (payload && typeof payload.seq === 'number' && typeof payload.stream === 'string' && payload.id) {
      (out[payload.stream] ??= []).push(payload.seq)
    }
  }
  return out
}

/** Records the domain events (envelopes) a socket receives, in order; presence and sync:head are not part of the log. */
function record (socket: ClientSocket): Array<{ event: string, payload: any }> {
  const seen: Array<{ event: string, payload: any }> = []
  socket.onAny((event: string, payload: any) => {
    if (payload && typeof payload.id === 'string' && typeof payload.seq === 'number') seen.push({ event, payload })
  })
  return seen
}

const range = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => from + i)

t.test('a client that was offline receives exactly the missed events of both streams, in order, before the ack', async t => {
  const { app, url } = await build(t)
  const company = await createCompany(app)
  const member = company.as('member')
  await publishBoth(app, company, 3)
  // The client saw seq 3 of both streams, then went offline while 5 more of each were published.
  await publishBoth(app, company, 5)
  const socket = await connect(t, url, member.token, { auth: { token: member.token, resume: true } })
  const seen = record(socket)
  const ack = await request(socket, 'sync:resume', { streams: { [companyOf(company)]: 3, [userOf(member)]: 3 } })
  t.same(ack, {
    ok: true,
    streams: {
      [companyOf(company)]: { recovered: true, replayed: 5, headSeq: 8 },
      [userOf(member)]: { recovered: true, replayed: 5, headSeq: 8 }
    }
  })
  t.same(seqsByStream(seen), { [companyOf(company)]: range(4, 8), [userOf(member)]: range(4, 8) })
  const first = seen[0]!.payload
  t.match(first, { stream: companyOf(company), seq: 4, type: 'project:deleted', companyId: company.id, actor: { userId: company.as('admin').id }, data: { projectId: 'p0' } })
  t.type(first.id, 'string')
  t.ok(!Number.isNaN(Date.parse(first.at)))
})

t.test('live events published while a resume runs are neither lost, duplicated, nor ahead of the replay', async t => {
  // Small pages and a small hold buffer exercise paging and the buffer-overflow path.
  const { app, url } = await build(t, { realtime: { eventLog: { pageSize: 7, maxHeldEvents: 5 } } })
  const company = await createCompany(app)
  const member = company.as('member')
  const stream = companyOf(company)
  await publishBoth(app, company, 40)
  let publishedDuringResumes = 0
  for (let iteration = 0; iteration < 8; iteration++) {
    const head = (await app.eventLog.heads([stream])).get(stream)!
    const lastSeq = Math.max(0, head - 30 - iteration)
    const socket = await connect(t, url, member.token, { auth: { token: member.token, resume: true } })
    const seen = record(socket)
    let publishing = true
    const publisher = (async () => {
      let published = 0
      while (publishing && published < 60) {
        await publishBoth(app, company, 1)
        published++
      }
      return published
    })()
    const ack = await request(socket, 'sync:resume', { streams: { [stream]: lastSeq } })
    publishing = false
    publishedDuringResumes += await publisher
    const finalHead = (await app.eventLog.heads([stream])).get(stream)!
    await waitFor(() => (seqsByStream(seen)[stream]?.at(-1) ?? 0) >= finalHead, 5000, 'live events after the resume')
    const seqs = seqsByStream(seen)[stream]!
    t.same(seqs, range(lastSeq + 1, finalHead), `iteration ${iteration}: contiguous, in order, once`)
    t.equal(ack.streams[stream].recovered, true)
    t.ok(ack.streams[stream].headSeq >= head)
    socket.disconnect()
  }
  t.ok(publishedDuringResumes >= 8, `events were published while resumes ran (${publishedDuringResumes})`)
})

t.test('a resume without the handshake hold still replays in order (duplicates only of what arrived live before it)', async t => {
  const { app, url } = await build(t)
  const company = await createCompany(app)
  const member = company.as('member')
  await publishBoth(app, company, 4)
  const socket = await connect(t, url, member.token)
  const seen = record(socket)
  const ack = await request(socket, 'sync:resume', { streams: { [companyOf(company)]: 1 } })
  t.same(ack.streams[companyOf(company)], { recovered: true, replayed: 3, headSeq: 4 })
  t.same(seqsByStream(seen)[companyOf(company)], [2, 3, 4])
})

t.test('a mutation whose transaction fails publishes nothing', async t => {
  const { app, url } = await build(t)
  const company = await createCompany(app)
  const socket = await connect(t, url, company.as('member').token)
  const seen = record(socket)
  await t.rejects(app.eventLog.transaction(async (tx, publish) => {
    await tx.project.create({ data: { companyId: company.id, name: 'doomed' } })
    await publish({ stream: companyOf(company), type: 'project:created', companyId: company.id, actorId: null, data: { project: {} } })
    throw new Error('business rule failed after publishing')
  }), /business rule failed/)
  // A failing domain route (409 on a second approval) publishes nothing either.
  const expense = await app.inject({ method: 'POST', url: '/expenses', headers: authHeader(company.as('member')), payload: { amountMinor: 100, currency: 'EUR', description: 'taxi' } })
  const id = expense.json().expense.id
  t.equal((await app.inject({ method: 'POST', url: `/expenses/${id}/approve`, headers: authHeader(company.as('manager')) })).statusCode, 200)
  t.equal((await app.inject({ method: 'POST', url: `/expenses/${id}/approve`, headers: authHeader(company.as('manager')) })).statusCode, 409)
  await sleep(100)
  t.equal(await app.prisma.project.count({ where: { name: 'doomed' } }), 0)
  const types = (await app.prisma.event.findMany({ where: { companyId: company.id }, orderBy: [{ stream: 'asc' }, { seq: 'asc' }] })).map(e => `${e.stream === companyOf(company) ? 'company' : 'user'}:${e.seq}:${e.type}`)
  t.same(types.sort(), ['company:1:expense:submitted', 'company:2:expense:approved', 'user:1:notification:new'].sort())
  t.same(seen.map(s => s.event).sort(), ['expense:approved', 'expense:submitted', 'notification:new'].sort())
  t.equal((await app.eventLog.heads([companyOf(company)])).get(companyOf(company)), 2)
})

t.test('a resume from before the oldest kept event answers recovered: false instead of a silent gap', async t => {
  const { app, url } = await build(t, { realtime: { eventLog: { maxLen: 5, ttlSeconds: 3600 } } })
  const company = await createCompany(app)
  const member = company.as('member')
  await publishBoth(app, company, 12)
  const deleted = await app.eventLog.prune()
  t.equal(deleted, 14, 'keeps the last 5 of each stream')
  const socket = await connect(t, url, member.token)
  const seen = record(socket)
  const ack = await request(socket, 'sync:resume', { streams: { [companyOf(company)]: 2, [userOf(member)]: 7 } })
  t.same(ack.streams[companyOf(company)], { recovered: false, replayed: 0, headSeq: 12 })
  t.same(ack.streams[userOf(member)], { recovered: true, replayed: 5, headSeq: 12 })
  t.same(seqsByStream(seen), { [userOf(member)]: range(8, 12) })

  // TTL: events older than ttlSeconds go too.
  await app.prisma.$executeRaw`UPDATE events SET "createdAt" = "createdAt" - interval '2 hours' WHERE stream = ${userOf(member)}`
  t.equal(await app.eventLog.prune(), 5)
  const again = await request(socket, 'sync:resume', { streams: { [userOf(member)]: 11 } })
  t.same(again.streams[userOf(member)], { recovered: false, replayed: 0, headSeq: 12 })
  // Up to date is always recoverable, even with nothing kept.
  const current = await request(socket, 'sync:resume', { streams: { [userOf(member)]: 12 } })
  t.same(current.streams[userOf(member)], { recovered: true, replayed: 0, headSeq: 12 })
})

t.test('regression: a hole inside the replayed range (an event pruned out of order) was replayed around and acked recovered: true', async t => {
  const { app, url } = await build(t)
  const company = await createCompany(app)
  const member = company.as('member')
  await publishBoth(app, company, 6)
  // What a prune batch still under way, or one between two pages, leaves behind.
  await app.prisma.$executeRaw`DELETE FROM events WHERE stream = ${companyOf(company)} AND seq = 3`
  const socket = await connect(t, url, member.token)
  const seen = record(socket)
  const ack = await request(socket, 'sync:resume', { streams: { [companyOf(company)]: 0 } })
  t.same(ack.streams[companyOf(company)], { recovered: false, replayed: 2, headSeq: 6 }, 'the client is told to refetch')
  t.same(seqsByStream(seen), { [companyOf(company)]: [1, 2] }, 'nothing past the hole is sent as if contiguous')
})

t.test('regression: an event recorded late in a long transaction got its transaction\'s start time, older than the seq before it (the TTL prune then cut a hole)', async t => {
  const { app } = await build(t)
  const company = await createCompany(app)
  const admin = company.as('admin')
  const stream = companyOf(company)
  const event = (projectId: string) => ({ stream, type: 'project:deleted' as const, companyId: company.id, actorId: admin.id, data: { projectId } })
  let begun!: () => void
  const hasBegun = new Promise<void>(resolve => { begun = resolve })
  let proceed!: () => void
  const mayProceed = new Promise<void>(resolve => { proceed = resolve })
  const long = app.eventLog.transaction(async (tx, publish) => {
    await tx.$queryRaw`SELECT 1`
    begun()
    await mayProceed
    await publish(event('late'))
  })
  await hasBegun
  await sleep(50)
  await app.eventLog.transaction(async (_tx, publish) => { await publish(event('early')) })
  proceed()
  await long
  const rows = await app.prisma.$queryRaw<Array<{ seq: number, createdAt: Date }>>`
    SELECT seq, "createdAt" FROM events WHERE stream = ${stream} ORDER BY seq`
  t.equal(rows.length, 2)
  t.ok(rows[1]!.createdAt.getTime() >= rows[0]!.createdAt.getTime(), 'createdAt grows with seq: a TTL prune removes a prefix of the stream')
})

t.test('regression: a resume on a node whose copies of the events were late (Redis stalled) replayed them, then delivered them again', async t => {
  const redis = await dedicatedRedis(t)
  const prefix = uniqueName('replay')
  t.teardown(() => dropRedisPrefix(redis.url, prefix).catch(() => {}))
  const db = await testDatabase(t)
  const realtime = { socket: { redis: redis.url, redisPrefix: prefix }, eventLog: { headIntervalMs: 0 } }
  const x = await build(t, { db, realtime })
  const y = await build(t, { db, realtime })
  const company = await createCompany(x.app)
  const member = company.as('member')
  const socket = await connect(t, x.url, member.token, { auth: { token: member.token, resume: true } })
  const seen = record(socket)
  await redis.pause()
  t.teardown(() => redis.resume())
  for (let i = 0; i < 3; i++) {
    await y.app.eventLog.transaction(async (_tx, publish) => {
      await publish({ stream: companyOf(company), type: 'project:deleted', companyId: company.id, actorId: member.id, data: { projectId: `p${i}` } })
    })
  }
  // What node x receives from node y, to know when y's late copies have arrived.
  const relayed: number[] = []
  x.app.io.on('erp:events', (envelopes: Array<{ seq: number }>) => { relayed.push(...envelopes.map(e => e.seq)) })
  const ack = await request(socket, 'sync:resume', { streams: { [companyOf(company)]: 0 } })
  t.same(ack.streams[companyOf(company)], { recovered: true, replayed: 3, headSeq: 3 })
  await redis.resume()
  await waitFor(() => [1, 2, 3].every(seq => relayed.includes(seq)), 5000, 'node y\'s late copies to reach node x')
  await sleep(100)
  t.same(seqsByStream(seen), { [companyOf(company)]: [1, 2, 3] }, 'each event once, in order, after the copies arrived')
})

// Regression: sync:resume replayed the whole retained company log to a socket whose user had been
// removed from the company since its handshake, until the periodic re-check (a minute) cut it.
t.test('a resume from a socket whose membership was removed since its last check replays nothing and revokes it', async t => {
  const { app, url, prisma } = await build(t)
  const company = await createCompany(app)
  const member = company.as('member')
  await publishBoth(app, company, 3)
  const socket = await connect(t, url, member.token)
  const seen = record(socket)
  // Past the window in which a passed check is taken as current, so the resume asks the database.
  await sleep(5200)
  t.same(await request(socket, 'sync:resume', { streams: { [companyOf(company)]: 0 } }),
    { ok: true, streams: { [companyOf(company)]: { recovered: true, replayed: 3, headSeq: 3 } } }, 'still a member: replayed')
  await prisma.membership.deleteMany({ where: { userId: member.id, companyId: company.id } })
  await sleep(5200)
  const revoked = nextEvent(socket, 'auth:revoked')
  const disconnected = new Promise(resolve => socket.once('disconnect', resolve))
  socket.emit('sync:resume', { streams: { [companyOf(company)]: 0, [userOf(member)]: 0 } }, () => t.fail('no ack reaches a revoked socket'))
  t.same(await revoked, { code: 'AUTH_NOT_A_MEMBER', message: 'No longer an active member of this company; this connection is closed' })
  t.equal(await disconnected, 'io server disconnect')
  t.equal(seen.length, 3, 'nothing replayed after the removal')
})

t.test('bad resume payloads are refused with a code and send nothing', async t => {
  const { app, url } = await build(t)
  const company = await createCompany(app)
  const other = await createCompany(app)
  const member = company.as('member')
  await publishBoth(app, company, 2)
  await publishBoth(app, other, 2)
  const socket = await connect(t, url, member.token)
  const seen = record(socket)
  const cases: Array<[string, unknown, string]> = [
    ['negative seq', { streams: { [companyOf(company)]: -1 } }, 'VALIDATION_FAILED'],
    ['fractional seq', { streams: { [companyOf(company)]: 1.5 } }, 'VALIDATION_FAILED'],
    ['string seq', { streams: { [companyOf(company)]: '1' } }, 'VALIDATION_FAILED'],
    ['no streams', { streams: {} }, 'VALIDATION_FAILED'],
    ['not an object', 'company', 'VALIDATION_FAILED'],
    ['malformed stream name', { streams: { 'room:secret': 0 } }, 'VALIDATION_FAILED'],
    ['extra keys', { streams: { [companyOf(company)]: 0 }, admin: true }, 'VALIDATION_FAILED'],
    ['another company stream', { streams: { [companyOf(other)]: 0 } }, 'SYNC_STREAM_FORBIDDEN'],
    ['another user stream', { streams: { [userOf(other.as('member'))]: 0 } }, 'SYNC_STREAM_FORBIDDEN'],
    ['own and foreign together', { streams: { [companyOf(company)]: 0, [companyOf(other)]: 0 } }, 'SYNC_STREAM_FORBIDDEN'],
    ['cursor ahead of head', { streams: { [companyOf(company)]: 99 } }, 'SYNC_CURSOR_AHEAD']
  ]
  for (const [name, payload, code] of cases) {
    const ack = await request(socket, 'sync:resume', payload)
    t.equal(ack.ok, false, name)
    t.equal(ack.error?.code, code, name)
  }
  await sleep(100)
  t.same(seen, [], 'nothing was sent')
  t.ok(socket.connected)
  const rooms = app.io.of('/').sockets.get(socket.id!)!.rooms
  t.same([...rooms].filter(r => r !== socket.id).sort(), [companyOf(company), userOf(member)].sort(), 'rooms unchanged (no hold left behind)')
})

t.test('a resume on a second app instance sharing the database gives the same result', async t => {
  const first = await build(t)
  const second = await build(t, { db: first.db })
  const company = await createCompany(first.app)
  const member = company.as('member')
  await publishBoth(first.app, company, 6)
  const results = []
  for (const { url } of [first, second]) {
    const socket = await connect(t, url, member.token, { auth: { token: member.token, resume: true } })
    const seen = record(socket)
    const ack = await request(socket, 'sync:resume', { streams: { [companyOf(company)]: 2, [userOf(member)]: 0 } })
    results.push({ ack, seen: seen.map(s => s.payload) })
  }
  t.same(results[1], results[0])
  t.same(seqsByStream(results[0]!.seen.map(payload => ({ event: payload.type, payload }))), { [companyOf(company)]: range(3, 6), [userOf(member)]: range(1, 6) })
})

t.test('sync:head lets an idle client notice a gap, and a node fills gaps from the log', async t => {
  const first = await build(t)
  // A second node on the same database without a shared adapter: its events reach the first
  // node's clients only through the log — like a publisher that crashed between commit and emit.
  const second = await build(t, { db: first.db })
  const company = await createCompany(first.app)
  const member = company.as('member')
  const socket = await connect(t, first.url, member.token)
  const seen = record(socket)
  await publishBoth(first.app, company, 1)
  await waitFor(() => seen.length >= 2, 2000, 'live events')
  await publishBoth(second.app, company, 2)
  await sleep(100)
  t.same(seqsByStream(seen)[companyOf(company)], [1], 'the other node\'s events did not arrive live')
  const head = nextEvent(socket, 'sync:head')
  await first.app.eventLog.beacon()
  t.same(await head, { stream: companyOf(company), seq: 3 })
  t.same(seqsByStream(seen)[companyOf(company)], [1, 2, 3], 'the beacon filled the gap in order')
  // And a live event after a jump is preceded by the missing ones.
  await publishBoth(second.app, company, 1)
  await publishBoth(first.app, company, 1)
  // The jump to seq 5 is filled by a read from PostgreSQL before either goes out.
  await waitFor(() => (seqsByStream(seen)[companyOf(company)]?.length ?? 0) >= 5, 10_000, 'gap fill')
  t.same(seqsByStream(seen)[companyOf(company)], [1, 2, 3, 4, 5])
  t.same(seqsByStream(seen)[userOf(member)], [1, 2, 3, 4, 5])
})

/**
 * Adds `count` user-stream rooms with no connected socket (stand-ins for other sockets' streams)
 * and counts the sync:head broadcasts; `onEmit` runs at each one.
 */
function absentStreams (app: FastifyInstance, count: number, onEmit?: () => void): () => number {
  const adapter = app.io.of('/').adapter
  adapter.addAll('absent-sockets', new Set(Array.from({ length: count }, (_, i) => `user:absent-${i}`)))
  let emitted = 0
  const broadcast = adapter.broadcast.bind(adapter)
  adapter.broadcast = (packet, opts) => {
    if ((packet as { data?: unknown[] }).data?.[0] === 'sync:head') {
      emitted++
      onEmit?.()
    }
    broadcast(packet, opts)
  }
  return () => emitted
}

t.test('a beacon over many streams runs in slices, with the event loop turning between them', async t => {
  // Regression: one beacon emitted sync:head to every stream in one go; with 1,000 sockets that
  // held the event loop for 6–12 ms, which requests and broadcasts arriving meanwhile waited out.
  const { app, url } = await build(t)
  const company = await createCompany(app)
  const member = company.as('member')
  const socket = await connect(t, url, member.token)
  // Stand-ins for 600 other sockets' user streams (rooms without a connected socket).
  const emitted = absentStreams(app, 600)
  const heads: Array<{ stream: string, seq: number }> = []
  socket.on('sync:head', (head: { stream: string, seq: number }) => heads.push(head))
  // What had been emitted at each turn of the event loop while the beacon ran.
  const turns: number[] = []
  let running = true
  const sample = () => {
    turns.push(emitted())
    if (running) setImmediate(sample)
  }
  const beacon = app.eventLog.beacon().finally(() => { running = false })
  setImmediate(sample)
  await beacon
  turns.push(emitted())
  t.equal(emitted(), 602, 'every stream got its sync:head: 600 stand-ins, the member\'s and the company\'s')
  const steps = turns.map((n, i) => n - (turns[i - 1] ?? 0)).filter(step => step > 0)
  t.ok(steps.length >= Math.ceil(602 / 128), `the streams went out over ${steps.length} turns`)
  t.ok(Math.max(...steps) <= 128, `at most 128 per turn (largest: ${Math.max(...steps)})`)
  await waitFor(() => heads.length >= 2, 2000, 'sync:head for the member\'s streams')
  t.same(heads.map(h => h.stream).sort(), [companyOf(company), userOf(member)].sort())
})

t.test('a beacon stops at its next slice once the app closes', async t => {
  const { app } = await build(t)
  let closed: Promise<void> | undefined
  // The app starts closing while the first slice is being sent.
  const emitted = absentStreams(app, 5000, () => { closed ??= app.close() })
  await app.eventLog.beacon()
  await closed
  t.ok(emitted() >= 128 && emitted() < 5000, `it stopped after ${emitted()} of 5,000 streams`)
})

t.test('regression: a beacon run by its timer went through all its slices during close (every() waited for it before its closing flag was set)', async t => {
  const { app } = await build(t, { realtime: { eventLog: { headIntervalMs: 10 } } })
  let closed: Promise<void> | undefined
  // The app starts closing while the timer's beacon sends its first slice.
  const emitted = absentStreams(app, 20_000, () => { closed ??= app.close() })
  await waitFor(() => closed !== undefined, 5000, 'a beacon to start')
  await closed
  t.ok(emitted() < 20_000, `it stopped after ${emitted()} of 20,000 streams`)
})

t.test('a socket that announced a resume but never sends it gets its held events after the window', async t => {
  // The window runs from the connection event: it must outlast the publishes and the check
  // below even on a loaded machine (with 300 ms, two slow transactions plus the 100 ms sleep
  // ended it before the check, and the released events were seen as not held).
  const resumeWindowMs = 1500
  const { app, url } = await build(t, { realtime: { eventLog: { resumeWindowMs } } })
  const company = await createCompany(app)
  const member = company.as('member')
  const socket: ClientSocket = await connect(t, url, member.token, { auth: { token: member.token, resume: true } })
  const seen = record(socket)
  await publishBoth(app, company, 2)
  await sleep(100)
  t.same(seen, [], 'held while the client may still resume')
  await waitFor(() => seen.length === 4, resumeWindowMs + 5000, 'held events released')
  t.same(seqsByStream(seen), { [companyOf(company)]: [1, 2], [userOf(member)]: [1, 2] })
})

t.test('regression: a socket held past the window whose hold overflowed was told nothing until the next event', async t => {
  // All four transactions must commit inside the window (which runs from the connection event):
  // with 300 ms, slow commits on a loaded machine let it end early, and the later events then went
  // out live (seen not empty, heads short of 4).
  const resumeWindowMs = 1500
  const { app, url } = await build(t, { realtime: { eventLog: { resumeWindowMs, maxHeldEvents: 2, headIntervalMs: 0 } } })
  const company = await createCompany(app)
  const member = company.as('member')
  const socket: ClientSocket = await connect(t, url, member.token, { auth: { token: member.token, resume: true } })
  const heads: Array<{ stream: string, seq: number }> = []
  socket.on('sync:head', (head: { stream: string, seq: number }) => heads.push(head))
  const seen = record(socket)
  await publishBoth(app, company, 4)
  await waitFor(() => heads.length === 2, resumeWindowMs + 5000, 'sync:head for both streams once the window ends')
  t.same(heads.sort((a, b) => a.stream.localeCompare(b.stream)), [
    { stream: companyOf(company), seq: 4 }, { stream: userOf(member), seq: 4 }
  ].sort((a, b) => a.stream.localeCompare(b.stream)), 'the client learns the heads and sees its gap')
  t.same(seen, [], 'the overflowed holds had dropped their events')
})

t.test('event ids are unique across streams and the envelope matches between live and replay', async t => {
  const { app, url } = await build(t)
  const company = await createCompany(app)
  const member = company.as('member')
  const socket = await connect(t, url, member.token)
  const live = record(socket)
  await publishBoth(app, company, 3)
  await waitFor(() => live.length === 6, 2000, 'live events')
  const replayer = await connect(t, url, member.token)
  const replayed = record(replayer)
  await request(replayer, 'sync:resume', { streams: { [companyOf(company)]: 0, [userOf(member)]: 0 } })
  const byId = (list: Array<{ payload: any }>) => list.map(s => s.payload).sort((a, b) => a.id.localeCompare(b.id))
  t.same(byId(replayed), byId(live))
  t.equal(new Set(live.map(s => s.payload.id)).size, 6)
  t.ok(live.every(s => typeof s.payload.id === 'string' && s.payload.id.length === randomUUID().length))
})

t.test('regression: a long replay leaves no drain/close listeners behind (MaxListenersExceededWarning)', async t => {
  const { app, url } = await build(t, { realtime: { eventLog: { pageSize: 100 } } })
  const company = await createCompany(app)
  const member = company.as('member')
  await app.eventLog.transaction(async (_tx, publish) => {
    for (let i = 0; i < 1500; i++) {
      await publish({ stream: `company:${company.id}`, type: 'project:deleted', companyId: company.id, actorId: null, data: { projectId: `p${i}` } })
    }
  })
  const warnings: Error[] = []
  const onWarning = (warning: Error) => { warnings.push(warning) }
  process.on('warning', onWarning)
  t.teardown(() => { process.off('warning', onWarning) })
  const socket = await connect(t, url, member.token)
  const conn = app.io.of('/').sockets.get(socket.id!)!.conn
  const before = { drain: conn.listenerCount('drain'), close: conn.listenerCount('close') }
  const seen = record(socket)
  const ack = await request(socket, 'sync:resume', { streams: { [companyOf(company)]: 0 } })
  t.same(ack.streams[companyOf(company)], { recovered: true, replayed: 1500, headSeq: 1500 })
  t.same(seqsByStream(seen)[companyOf(company)], range(1, 1500))
  t.same({ drain: conn.listenerCount('drain'), close: conn.listenerCount('close') }, before)
  t.same(warnings.filter(w => w.name === 'MaxListenersExceededWarning'), [])
})

t.test('a storm of clients resuming at once is served completely with bounded concurrent log reads', async t => {
  const { app, url } = await build(t, { realtime: { eventLog: { pageSize: 50, maxConcurrentReads: 2 } } })
  const company = await createCompany(app, ['admin', ...Array.from({ length: 12 }, () => 'member' as const)])
  await app.eventLog.transaction(async (_tx, publish) => {
    for (let i = 0; i < 300; i++) {
      await publish({ stream: companyOf(company), type: 'project:deleted', companyId: company.id, actorId: null, data: { projectId: `p${i}` } })
    }
  })
  // Count the log reads running at once while every member resumes from 0 simultaneously
  // (a counting wrapper around the real client: the reads still go to PostgreSQL).
  let active = 0
  let peak = 0
  const original = app.prisma.$queryRaw.bind(app.prisma)
  ;(app.prisma as any).$queryRaw = async (...args: any[]) => {
    const sql = String(args[0]?.strings?.join?.('?') ?? args[0])
    const counted = sql.includes('FROM events WHERE stream')
    if (counted) peak = Math.max(peak, ++active)
    try { return await (original as any)(...args) } finally { if (counted) active-- }
  }
  t.teardown(() => { (app.prisma as any).$queryRaw = original })
  const members = company.users.filter(u => u.role === 'member')
  const sockets = await Promise.all(members.map(m => connect(t, url, m.token, { auth: { token: m.token, resume: true } })))
  const seen = sockets.map(s => record(s))
  const acks = await Promise.all(sockets.map(s => request(s, 'sync:resume', { streams: { [companyOf(company)]: 0 } })))
  for (const [i, ack] of acks.entries()) {
    t.same(ack.streams[companyOf(company)], { recovered: true, replayed: 300, headSeq: 300 }, `client ${i}`)
    t.same(seqsByStream(seen[i]!)[companyOf(company)], range(1, 300), `client ${i} got every event once, in order`)
  }
  t.ok(peak >= 1 && peak <= 2, `at most maxConcurrentReads log reads at once (peak ${peak})`)
})

// Regression (review): a transaction that published more than 10,000 events relayed them in one
// erp:events message, which every other node refused whole as malformed (at most 10,000), so its
// events reached them only through their next gap fill.
t.test('a transaction with more than 10,000 events is relayed to the other nodes in chunks they accept', async t => {
  const prefix = uniqueName('relay')
  t.teardown(() => dropRedisPrefix(TEST_REDIS_URL, prefix).catch(() => {}))
  const db = await testDatabase(t)
  // 10,001 statements in one transaction: a loaded CI machine took longer than the default 15 s.
  const realtime = { socket: { redis: TEST_REDIS_URL, redisPrefix: prefix }, eventLog: { headIntervalMs: 0, transactionTimeoutMs: 120_000 } }
  const x = await build(t, { db, realtime })
  const y = await build(t, { db, realtime })
  const company = await createCompany(x.app)
  const relayed: number[] = []
  x.app.io.on('erp:events', (envelopes: Array<{ seq: number }>) => { relayed.push(envelopes.length) })
  await waitFor(async () => (await y.app.erpSocket.serverCount()) === 2, 5000, 'both nodes on the adapter')
  const stream = `user:${company.as('member').id}` as const
  await y.app.eventLog.transaction(async (_tx, publish) => {
    for (let i = 0; i < 10_001; i++) {
      await publish({ stream, type: 'notification:new', companyId: company.id, actorId: company.as('admin').id, data: { kind: 'bulk', message: `n${i}` } })
    }
  })
  await waitFor(() => relayed.reduce((a, b) => a + b, 0) === 10_001, 30_000, 'all 10,001 relayed')
  t.same(relayed, [10_000, 1], 'two messages, each within what a receiver accepts')
})

// Regression (review): a node kept following a stream after its last listener left, missed the
// other node's copies (no Redis here), and a socket joining later started from that stale
// position: the next event's gap fill sent it events committed before it connected.
t.test('a socket joining a stream its node followed without listeners gets only events from its connection on', async t => {
  const db = await testDatabase(t)
  const a = await build(t, { db })
  const b = await build(t, { db })
  const company = await createCompany(a.app)
  const member = company.as('member')
  const publishOn = (app: FastifyInstance, n: number) => publishBoth(app, company, n)
  const first = await connect(t, a.url, member.token)
  await publishOn(a.app, 1)
  first.disconnect()
  await waitFor(() => !a.app.io.of('/').adapter.rooms.has(companyOf(company)), 5000, 'the stream has no listener on node a')
  await publishOn(b.app, 2) // node a does not hear of seqs 2 and 3
  const socket = await connect(t, a.url, member.token)
  const seen = record(socket)
  await publishOn(a.app, 1)
  await waitFor(() => seqsByStream(seen)[companyOf(company)]?.length === 1, 5000, 'the new event')
  await sleep(200)
  t.same(seqsByStream(seen), { [companyOf(company)]: [4], [userOf(member)]: [4] }, 'nothing from before the connection')
})
