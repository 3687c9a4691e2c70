import { randomBytes } from 'node:crypto'
import { io as ioClient, type Socket } from 'socket.io-client'
import { RedisPresenceStore } from '../../plugins/presence/redis-store.ts'
import { now, sleep } from '../lib/clock.ts'
import type { ClientPool } from '../lib/context.ts'
import { memory, type Memory } from '../lib/memory.ts'
import type { Row, Scenario } from '../lib/scenario.ts'
import { dropRedisPrefix } from '../lib/redis.ts'
import { Histogram, median, round, type Percentiles } from '../lib/stats.ts'

/**
 * presence: (1) `presence:list` latency over one socket with N users present in its company, and
 * the memory one presence entry costs (heap after a full GC, or Redis MEMORY USAGE with --redis);
 * (2) fan-out of a status change (`presence:set` → `presence:changed` to the company room) to M
 * connected members, measured from the sender's request start to each member's receipt.
 *
 * The N entries of (1) are written straight into the node's presence store (the same entries a
 * connection creates): connecting N real sockets of one company first announces each arrival to
 * everyone already there, N²/2 deliveries (12.5 M for 5,000; see `connect --companies 1`).
 * Baselines: a raw Socket.IO ack answering a prebuilt array of N entries, and a raw
 * `io.to(room).emit` from a `presence:set` handler.
 *
 * Flags: --users 5000 --lists 200 --members 1000 --changes 100 --rate 20 --concurrency 100 --redis (Redis store).
 */

const BENCH_REDIS_URL = process.env.BENCH_REDIS_URL ?? 'redis://127.0.0.1:6379'

interface ListRep { latency: Percentiles, bytes: number }
interface FanoutRep { latency: Percentiles, expected: number, received: number }

function open (url: string, token?: string): Promise<Socket> {
  const socket = ioClient(url, { transports: ['websocket'], reconnection: false, forceNew: true, auth: token ? { token } : {} })
  return new Promise((resolve, reject) => {
    socket.once('connect', () => resolve(socket))
    socket.once('connect_error', reject)
  })
}

async function listLatency (socket: Socket, count: number): Promise<ListRep> {
  const h = new Histogram()
  let bytes = 0
  for (let i = 0; i < count; i++) {
    const t0 = now()
    const answer = await socket.timeout(30_000).emitWithAck('presence:list')
    h.record(now() - t0)
    if (!answer?.ok) throw new Error(`presence:list answered ${JSON.stringify(answer).slice(0, 200)}`)
    if (i === 0) bytes = JSON.stringify(answer).length
  }
  return { latency: h.percentiles(), bytes }
}

/** `count` status changes at `rate`/s from `sender` (open loop), each carrying its start time. */
async function changes (sender: Socket, clients: ClientPool, group: string, size: number, count: number, rate: number): Promise<FanoutRep> {
  const interval = 1000 / rate
  const start = now() + 5
  for (let i = 0; i < count; i++) {
    const wait = start + i * interval - now()
    if (wait > 0) await sleep(wait)
    // viewing.id carries the request start, so every receipt knows its latency.
    sender.emit('presence:set', { status: 'online', viewing: { type: 'bench', id: String(now()) } })
  }
  const expected = count * size
  await clients.waitForCount(group, expected, now() + 15_000)
  const got = await clients.collect(group)
  return { latency: (got.series.request ?? new Histogram()).percentiles(), expected, received: got.received }
}

export const presence: Scenario = {
  name: 'presence',
  description: 'presence:list with 5,000 users present in one company (p99, memory per entry); status change fan-out to 1,000 members',
  default: false,
  flags: '--users 5000 --lists 200 --members 1000 --changes 100 --rate 20 --concurrency 100 --redis (Redis store)',
  async run (ctx) {
    const users = ctx.number('users', ctx.quick ? 1000 : 5000)
    const lists = ctx.number('lists', ctx.quick ? 50 : 200)
    const members = ctx.number('members', ctx.quick ? 200 : 1000)
    const count = ctx.number('changes', ctx.quick ? 30 : 100)
    const rate = ctx.number('rate', 20)
    const redis = ctx.flags.redis === true
    const parameters = { users, listsPerRep: lists, members, changesPerRep: count, rate, connectConcurrency: ctx.number('concurrency', 100), store: redis ? 'redis' : 'memory', reps: ctx.reps, clientProcesses: 2 }

    const db = await ctx.database()
    const company = await ctx.seed(db, members + 1)
    const redisPrefix = `bench-${randomBytes(4).toString('hex')}`
    const config = redis ? { redisUrl: BENCH_REDIS_URL, redisPrefix } : {}
    const [ours, raw, clients] = await Promise.all([ctx.startServer(db, { config }), ctx.startBaseline(), ctx.clients(2)])
    const tokens: string[] = await ours.call('tokens', { companyId: company.companyId, users: company.users })
    const [adminToken, ...memberTokens] = tokens

    // ---- (1) presence:list over N entries, and memory per entry ----
    const seeded = await ours.call<{ bytesPerEntry: number }>('presence:seed', { companyId: company.companyId, users }, 120_000)
    const rawSeeded = await raw.call<{ bytesPerEntry: number }>('presence:seed', { users })
    const listReps: { ours: ListRep[], raw: ListRep[] } = { ours: [], raw: [] }
    const oursSocket = await open(ours.url, adminToken)
    const rawSocket = await open(raw.url)
    for (let rep = 0; rep < ctx.reps; rep++) {
      for (const [kind, socket] of rep % 2 ? [['raw', rawSocket], ['ours', oursSocket]] as const : [['ours', oursSocket], ['raw', rawSocket]] as const) {
        await listLatency(socket, Math.ceil(lists / 10)) // warm-up
        const result = await listLatency(socket, lists)
        listReps[kind].push(result)
        ctx.log(`list ${users} rep ${rep + 1} ${kind}: p50 ${round(result.latency.p50)} p99 ${round(result.latency.p99)} ms, ${round(result.bytes / 1024)} KB`)
      }
    }
    ctx.log(`memory per presence entry: ${round(seeded.bytesPerEntry)} B (${redis ? 'Redis MEMORY USAGE' : 'heap'}) vs ${round(rawSeeded.bytesPerEntry)} B (plain object)`)
    await ours.call('presence:unseed', { companyId: company.companyId, users }, 120_000)

    // ---- (2) status change fan-out to M members ----
    ctx.log(`${members} members: connecting`)
    // Each arrival is announced to everyone already connected (M²/2 deliveries while connecting):
    // a lower concurrency keeps single handshakes inside the clients' 20 s timeout.
    const concurrency = ctx.number('concurrency', 100)
    const a = await clients.connect('ours-members', ours.url, { tokens: memberTokens.slice(0, members), concurrency, deadlineMs: 300_000 })
    const b = await clients.connect('raw-members', raw.url, { count: members, concurrency })
    if (a.failed || b.failed) throw new Error(`connect failed: ours ${JSON.stringify(a.errors)}, raw ${JSON.stringify(b.errors)}`)
    await sleep(1000) // let the arrival announcements drain
    await Promise.all(clients.procs.flatMap(p => [p.call('presence:listen', { group: 'ours-members' }), p.call('presence:listen', { group: 'raw-members' })]))
    const fanReps: { ours: FanoutRep[], raw: FanoutRep[] } = { ours: [], raw: [] }
    for (let rep = 0; rep < ctx.reps; rep++) {
      for (const [kind, socket] of rep % 2 ? [['raw', rawSocket], ['ours', oursSocket]] as const : [['ours', oursSocket], ['raw', rawSocket]] as const) {
        const group = `${kind}-members`
        await changes(socket, clients, group, members, Math.ceil(count / 5), rate) // warm-up
        const result = await changes(socket, clients, group, members, count, rate)
        fanReps[kind].push(result)
        ctx.log(`fan-out ${members} rep ${rep + 1} ${kind}: p50 ${round(result.latency.p50)} p99 ${round(result.latency.p99)} ms, ${result.received}/${result.expected} received`)
      }
    }
    oursSocket.disconnect()
    rawSocket.disconnect()
    await clients.disconnect('ours-members')
    await clients.disconnect('raw-members')
    if (redis) {
      // A stopped node leaves its users' grace periods for other nodes to end; there are none here.
      await ours.stop()
      await dropRedisPrefix(BENCH_REDIS_URL, redisPrefix)
    }

    const rows: Row[] = []
    const listRow = (metric: 'p50' | 'p99', summary: boolean): Row => {
      const s = { ours: listReps.ours.map(r => r.latency[metric]), baseline: listReps.raw.map(r => r.latency[metric]) }
      return { label: `presence:list ${users}`, metric, unit: 'ms', better: 'lower', summary, baselineName: 'raw ack', ours: median(s.ours), baseline: median(s.baseline), reps: s }
    }
    const fanRow = (metric: 'p50' | 'p99', summary: boolean): Row => {
      const s = { ours: fanReps.ours.map(r => r.latency[metric]), baseline: fanReps.raw.map(r => r.latency[metric]) }
      return { label: `presence fan-out ${members}`, metric, unit: 'ms', better: 'lower', summary, baselineName: 'raw emit', ours: median(s.ours), baseline: median(s.baseline), reps: s }
    }
    rows.push(listRow('p50', false), listRow('p99', true), {
      label: `presence entry (${redis ? 'redis' : 'memory'})`, metric: 'bytes/entry', unit: 'B', better: 'lower', summary: true, baselineName: 'plain object',
      ours: seeded.bytesPerEntry, baseline: rawSeeded.bytesPerEntry, reps: { ours: [seeded.bytesPerEntry], baseline: [rawSeeded.bytesPerEntry] }
    }, fanRow('p50', false), fanRow('p99', true))
    const lost = [...fanReps.ours, ...fanReps.raw].reduce((s, r) => s + r.expected - r.received, 0)
    return {
      parameters,
      rows,
      raw: { seeded, rawSeeded, listReps, fanReps, connect: { ours: a, raw: b } },
      notes: [
        `presence:list entries were written straight into the ${redis ? 'Redis' : 'memory'} store (no N real sockets; see the scenario's comment)`,
        ...(lost > 0 ? [`${lost} presence:changed deliveries missing`] : [])
      ]
    }
  },

  serverCommands: {
    /** Writes `users` presence entries of one company into the node's store; returns the memory they take. */
    async seed ({ companyId, users }: { companyId: string, users: number }, { app }) {
      const store = app.presence.store
      const ref = (i: number) => ({ companyId, userId: `bench-user-${i}`, socketId: `bench-socket-${i}` })
      const measure = async (): Promise<number> => {
        if (store instanceof RedisPresenceStore) {
          let total = 0
          for (const key of [`${store.prefix}:users:${companyId}`, `${store.prefix}:sockets:${companyId}`, `${store.prefix}:expiry`]) {
            total += Number(await store.redis.call('MEMORY', 'USAGE', key, 'SAMPLES', '0') ?? 0)
          }
          return total
        }
        return memory().heapUsed
      }
      const before = await measure()
      for (let i = 0; i < users; i += 500) {
        await Promise.all(Array.from({ length: Math.min(500, users - i) }, (_, j) => store.connect(ref(i + j), 3_600_000)))
      }
      const after = await measure()
      return { bytesPerEntry: (after - before) / users, before, after }
    },
    async unseed ({ companyId, users }: { companyId: string, users: number }, { app }) {
      const store = app.presence.store
      for (let i = 0; i < users; i += 500) {
        await Promise.all(Array.from({ length: Math.min(500, users - i) }, (_, j) => store.disconnect({ companyId, userId: `bench-user-${i + j}`, socketId: `bench-socket-${i + j}` }, 0)))
      }
      await store.sweep(users * 2)
      return { users }
    }
  },

  baselineCommands: {
    /** The baseline's "store": a prebuilt array of entries shaped like ours. */
    seed ({ users }: { users: number }, baseline) {
      const before: Memory = memory()
      const since = new Date().toISOString()
      const entries = Array.from({ length: users }, (_, i) => ({ userId: `bench-user-${i}`, status: 'online', devices: 1, since }))
      baseline.store.set('presence', entries)
      const after = memory()
      return { bytesPerEntry: (after.heapUsed - before.heapUsed) / users }
    }
  },

  baselineConnection (socket, baseline) {
    socket.on('presence:list', (ack: (answer: unknown) => void) => {
      ack({ ok: true, users: baseline.store.get('presence') ?? [] })
    })
    socket.on('presence:set', (change: { status: string, viewing?: unknown }) => {
      baseline.io.to(baseline.room).emit('presence:changed', { userId: 'bench', status: change.status, devices: 1, viewing: change.viewing, at: new Date().toISOString() })
    })
  },

  clientCommands: {
    /** Records, per group socket, the latency of every bench `presence:changed` (viewing.id = request start). */
    listen ({ group: name }: { group: string }, client) {
      const g = client.group(name)
      for (const socket of g.sockets) {
        socket.on('presence:changed', (change: { viewing?: { type?: string, id?: string } }) => {
          if (change?.viewing?.type !== 'bench') return
          const t = now()
          let h = g.series.get('request')
          if (!h) g.series.set('request', h = new Histogram())
          h.record(t - Number(change.viewing.id))
          if (g.received === 0) g.firstRecv = t
          g.received++
          g.lastRecv = t
        })
      }
      return { sockets: g.sockets.length }
    }
  }
}
