import t, { type Test } from 'tap'
import type { FastifyInstance } from 'fastify'
import type { Socket as ClientSocket } from 'socket.io-client'
import type { PrismaClient } from '../src/generated/prisma/client.ts'
import type { Database } from '../src/db/index.ts'
import { build, connect, createCompany, request, sleep, testDatabase, type TestCompany } from './helpers.ts'
import { userStream } from '../plugins/events.ts'

// The resume's promises when reads of the event log fail or race the retention job. Reads go to
// the real PostgreSQL; a thin wrapper around the Prisma client lets a test act when erp-offline-
// queue reads events (fail one read, or prune right after one), to force the interleavings.

type EventRead = { afterSeq: number, limit: number, run: () => Promise<unknown> }

/** The database with its Prisma client's `$queryRaw` calls going through `onQuery`. */
function interceptQueries (db: Database, onQuery: (sql: string, values: unknown[], run: () => Promise<unknown>) => Promise<unknown>): Database {
  const prisma = new Proxy(db.prisma, {
    get (target, prop) {
      const value = Reflect.get(target, prop, target) as unknown
      if (prop === '$queryRaw') {
        return (strings: TemplateStringsArray, ...values: unknown[]) =>
          onQuery(strings.join('?'), values, () => (value as PrismaClient['$queryRaw']).call(target, strings, ...values))
      }
      return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(target) : value
    }
  })
  return { ...db, prisma }
}

/** The database with its Prisma client's event reads (`FROM events WHERE stream = ...`) going through `onRead`. */
function interceptEventReads (db: Database, onRead: (read: EventRead) => Promise<unknown>): Database {
  return interceptQueries(db, (sql, values, run) => sql.includes('FROM events WHERE stream =')
    ? onRead({ afterSeq: Number(values[1]), limit: Number(values[2]), run })
    : run())
}

async function publish (app: FastifyInstance, company: TestCompany, n: number) {
  for (let i = 0; i < n; i++) {
    await app.eventLog.publish({ stream: `company:${company.id}`, type: 'project:deleted', companyId: company.id, actorId: company.as('admin').id, data: { projectId: `p${i}` } })
  }
}

function seqsOf (socket: ClientSocket): number[] {
  const seqs: number[] = []
  socket.on('project:deleted', (envelope: { seq: number }) => { seqs.push(envelope.seq) })
  return seqs
}

/** Node A (reads intercepted) and node B on one database without Redis: A never gets B's events live. */
async function twoNodes (t: Test, onRead: (read: EventRead) => Promise<unknown>) {
  const db = await testDatabase(t)
  const a = await build(t, { db: interceptEventReads(db, onRead) })
  const b = await build(t, { db })
  const company = await createCompany(a.app, ['admin', 'member'])
  return { a, b, company }
}

// Regression: node A's gap fill failed (skipping 4-5) while a resume was held, live delivery went on
// with 6, and the release handed over [3, 6] with recovered: true: a hole the client could not see.
t.test('a gap fill that fails during a resume leaves no hole: the replay reads the skipped events from the log', async t => {
  let onReplayRead: (() => Promise<void>) | undefined
  let failFill = false
  const { a, b, company } = await twoNodes(t, async read => {
    if (failFill && read.afterSeq === 3) {
      failFill = false
      throw new Error('the fill read fails (test)')
    }
    const rows = await read.run()
    if (read.afterSeq === 2 && onReplayRead) {
      const act = onReplayRead
      onReplayRead = undefined
      await act()
    }
    return rows
  })
  await publish(a.app, company, 3)
  const member = company.as('member')
  const socket = await connect(t, a.url, member.token, { auth: { token: member.token, resume: true } })
  const seqs = seqsOf(socket)
  // Right after the replay read 3: node B commits 4 and 5 (A does not hear of them), then A
  // commits 6, whose jump makes A fill 4-5 from the log; that read fails.
  onReplayRead = async () => {
    await publish(b.app, company, 2)
    failFill = true
    await publish(a.app, company, 1)
    await sleep(200)
  }
  const ack = await request(socket, 'sync:resume', { streams: { [`company:${company.id}`]: 2 } })
  t.same(ack, { ok: true, streams: { [`company:${company.id}`]: { recovered: true, replayed: 4, headSeq: 6 } } })
  t.same(seqs, [3, 4, 5, 6], 'every event once, in order')
})

// Regression: the resume's catch-up read failed once, the socket was released with node A still at
// 3, and A's next event made it fill 4-5 again for the room: the client got 4, 5 twice.
t.test('a catch-up read that fails is tried again, so replayed events are not delivered twice', async t => {
  let replayRead = false
  let fails = 0
  const { a, b, company } = await twoNodes(t, async read => {
    if (read.afterSeq === 3) {
      if (!replayRead) {
        replayRead = true
      } else if (fails < 1) {
        fails++
        throw new Error('the catch-up read fails once (test)')
      }
    }
    return await read.run()
  })
  await publish(a.app, company, 3)
  const member = company.as('member')
  const socket = await connect(t, a.url, member.token, { auth: { token: member.token, resume: true } })
  const seqs = seqsOf(socket)
  await publish(b.app, company, 2)
  const ack = await request(socket, 'sync:resume', { streams: { [`company:${company.id}`]: 3 } })
  t.same(ack, { ok: true, streams: { [`company:${company.id}`]: { recovered: true, replayed: 2, headSeq: 5 } } })
  t.equal(fails, 1, 'the catch-up failed once')
  await publish(a.app, company, 1)
  await sleep(300)
  t.same(seqs, [4, 5, 6], 'nothing twice')
})

t.test('a catch-up that keeps failing fails the resume with SERVICE_UNAVAILABLE instead of acking it', async t => {
  let replayRead = false
  const { a, b, company } = await twoNodes(t, async read => {
    if (read.afterSeq === 3) {
      if (replayRead) throw new Error('the catch-up read fails (test)')
      replayRead = true
    }
    return await read.run()
  })
  await publish(a.app, company, 3)
  const member = company.as('member')
  const socket = await connect(t, a.url, member.token, { auth: { token: member.token, resume: true } })
  await publish(b.app, company, 2)
  const ack = await request(socket, 'sync:resume', { streams: { [`company:${company.id}`]: 3 } })
  t.equal(ack.ok, false)
  t.equal(ack.error?.code, 'SERVICE_UNAVAILABLE')
  t.match(ack.error?.message, /resume again/)
})

// Regression (replay review): a replay whose second page read failed sent the live events it held
// (11, 12) right after 1-3 and before the error ack, ahead of 4-10: a client applying what arrives
// and resuming from its last seq lost 4-10.
t.test('a failed resume sends none of the live events it held: nothing arrives ahead of the part it could not replay', async t => {
  let onSecondPage: (() => Promise<void>) | undefined
  const db = await testDatabase(t)
  const { app, url } = await build(t, {
    db: interceptEventReads(db, async read => {
      if (read.afterSeq === 3 && onSecondPage) {
        const act = onSecondPage
        onSecondPage = undefined
        await act()
        throw new Error('the second page read fails (test)')
      }
      return await read.run()
    }),
    realtime: { eventLog: { pageSize: 3 } }
  })
  const company = await createCompany(app, ['admin', 'member'])
  await publish(app, company, 10)
  const member = company.as('member')
  const socket = await connect(t, url, member.token, { auth: { token: member.token, resume: true } })
  const seqs = seqsOf(socket)
  onSecondPage = async () => {
    await publish(app, company, 2)
    await sleep(100)
  }
  const stream = `company:${company.id}`
  const heads: Array<{ stream: string, seq: number }> = []
  socket.on('sync:head', head => { heads.push(head) })
  const ack = await request(socket, 'sync:resume', { streams: { [stream]: 0 } })
  t.equal(ack.ok, false, 'the resume failed')
  t.same(seqs, [1, 2, 3], 'before the error ack: the first page only, not the held 11 and 12')
  t.same(heads, [{ stream, seq: 12 }], 'and where the stream is')
  // Resumed again from the last applied seq: the rest, each once, in order.
  const again = await request(socket, 'sync:resume', { streams: { [stream]: 3 } })
  t.same(again, { ok: true, streams: { [stream]: { recovered: true, replayed: 9, headSeq: 12 } } })
  t.same(seqs, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
})

// Regression (replay review): a resume refused for one stream (SYNC_CURSOR_AHEAD) sent the other
// stream's held live events before the error ack, though that stream was never replayed.
t.test('a resume refused for one stream sends none of the other stream\'s held events before its ack', async t => {
  let onHeadsRead: (() => Promise<void>) | undefined
  const db = await testDatabase(t)
  const intercepted = interceptQueries(db, async (sql, _values, run) => {
    const rows = await run()
    if (sql.includes('FROM stream_heads') && onHeadsRead) {
      const act = onHeadsRead
      onHeadsRead = undefined
      await act()
    }
    return rows
  })
  const { app, url } = await build(t, { db: intercepted })
  const company = await createCompany(app, ['admin', 'member'])
  const member = company.as('member')
  const stream = userStream(member.id)
  const notify = () => app.eventLog.publish({ stream, type: 'notification:new', companyId: company.id, actorId: null, data: { kind: 'test', message: 'hi' } })
  await notify()
  const socket = await connect(t, url, member.token, { auth: { token: member.token, resume: true } })
  const notified: number[] = []
  socket.on('notification:new', (envelope: { seq: number }) => { notified.push(envelope.seq) })
  // While the company stream's heads are read, the user stream gets a live event (held).
  onHeadsRead = async () => {
    await notify()
    await sleep(100)
  }
  const ack = await request(socket, 'sync:resume', { streams: { [`company:${company.id}`]: 5, [stream]: 0 } })
  t.equal(ack.error?.code, 'SYNC_CURSOR_AHEAD')
  t.same(notified, [], 'the held notification 2 did not arrive ahead of 1')
  const again = await request(socket, 'sync:resume', { streams: { [stream]: 0 } })
  t.same(again, { ok: true, streams: { [stream]: { recovered: true, replayed: 2, headSeq: 2 } } })
  t.same(notified, [1, 2])
})

// Regression: the retention job ran between two replay pages and removed the rest of the range;
// the empty next page was taken for "caught up" and the ack said recovered: true at seq 2 of 5.
t.test('events pruned between two replay pages answer recovered: false', async t => {
  let pruneAfterFirstPage: (() => Promise<unknown>) | undefined
  const db = await testDatabase(t)
  const { app, url } = await build(t, {
    db: interceptEventReads(db, async read => {
      const rows = await read.run()
      if (read.afterSeq === 0 && pruneAfterFirstPage) {
        const prune = pruneAfterFirstPage
        pruneAfterFirstPage = undefined
        await prune()
      }
      return rows
    }),
    realtime: { eventLog: { pageSize: 2, ttlSeconds: 1 } }
  })
  const company = await createCompany(app, ['admin', 'member'])
  await publish(app, company, 5)
  await app.prisma.$executeRaw`UPDATE events SET "createdAt" = "createdAt" - interval '1 hour' WHERE "companyId" = ${company.id}`
  const member = company.as('member')
  const socket = await connect(t, url, member.token)
  const seqs = seqsOf(socket)
  pruneAfterFirstPage = () => app.eventLog.prune()
  const ack = await request(socket, 'sync:resume', { streams: { [`company:${company.id}`]: 0 } })
  t.same(ack, { ok: true, streams: { [`company:${company.id}`]: { recovered: false, replayed: 2, headSeq: 5 } } })
  t.same(seqs, [1, 2])
})

// Regression (lifecycle review): replays waiting for a read slot (maxConcurrentReads) when the
// app closed still read the event log after close() resolved, against a database the server
// closes next ("Cannot use a pool after calling end on the pool", logged for each).
t.test('resumes still waiting for a read when the app closes read nothing after close', async t => {
  let closed = false
  let readsAfterClose = 0
  const db = await testDatabase(t)
  const { app, url } = await build(t, {
    db: interceptEventReads(db, async read => {
      if (closed) readsAfterClose++
      await sleep(100) // a slow log: the resumes queue behind one another
      return await read.run()
    }),
    realtime: { eventLog: { maxConcurrentReads: 1 } }
  })
  const company = await createCompany(app, ['admin'])
  await publish(app, company, 3)
  const sockets = await Promise.all(Array.from({ length: 8 }, () => connect(t, url, company.as('admin').token)))
  for (const socket of sockets) socket.timeout(10_000).emitWithAck('sync:resume', { streams: { [`company:${company.id}`]: 0 } }).catch(() => {})
  await sleep(150) // the first replay reads; the others wait for the slot
  await app.close()
  closed = true
  await sleep(1000) // the queue would have drained by now
  t.equal(readsAfterClose, 0, 'no event read after close')
})
