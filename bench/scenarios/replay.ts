import { randomUUID } from 'node:crypto'
import { companyStream } from '../../plugins/events.ts'
import { Prisma } from '../../src/generated/prisma/client.ts'
import { now } from '../lib/clock.ts'
import { medians, type Row, type Scenario } from '../lib/scenario.ts'
import { median, round, samplePercentiles } from '../lib/stats.ts'

/**
 * replay (issue 4): 10,000 events published while a client was away, then one client connects
 * and sends sync:resume: time from the request to its ack, with every event received in order.
 * Baseline: the same number of envelopes emitted from memory to one socket, then an ack.
 * publish overhead: a domain mutation (project.create in a transaction) with its event recorded
 * through fastify.eventLog, against the same mutation without it, alternating, in one process;
 * and the one-statement path (eventLog.commit) against the same INSERT alone.
 */

/** Median ms per operation of one repetition. */
interface Overhead { withEvent: number, without: number, statementWithEvent: number, statementWithout: number }

const sampleProject = (i: number) => ({
  id: `00000000-0000-4000-8000-${String(i).padStart(12, '0')}`,
  name: `Replayed project ${i}`,
  description: '',
  status: 'active',
  budgetMinor: 0,
  version: 1,
  createdAt: new Date().toISOString(),
  updatedAt: new Date().toISOString()
})

interface ResumeResult {
  ms: number
  received: number
  inOrder: boolean
  ack: { ok: boolean, streams?: Record<string, { recovered: boolean, replayed: number, headSeq: number }> }
}

export const replay: Scenario = {
  name: 'replay',
  description: 'sync:resume of 10,000 missed events to one client; publish overhead of the event log',
  default: true,
  flags: '--events 10000 --ops 300 --batch 500',
  budgetSeconds: 45,

  serverCommands: {
    /** Publishes `count` project:created events on the company stream, `batch` per transaction. */
    async publish ({ companyId, actorId, count, batch }: { companyId: string, actorId: string, count: number, batch: number }, { app }) {
      const stream = companyStream(companyId)
      const started = now()
      for (let done = 0; done < count; done += batch) {
        await app.eventLog.transaction(async (_tx, publish) => {
          for (let i = done; i < Math.min(count, done + batch); i++) {
            await publish({ stream, type: 'project:created', companyId, actorId, data: { project: sampleProject(i) } })
          }
        })
      }
      const head = (await app.eventLog.heads([stream])).get(stream) ?? 0
      return { ms: now() - started, head }
    },
    async head ({ stream }: { stream: string }, { app }) {
      return (await app.eventLog.heads([stream])).get(stream) ?? 0
    },
    /** Per-operation ms of project.create with and without its event, alternating; the same for one-statement inserts. */
    async overhead ({ companyId, actorId, count }: { companyId: string, actorId: string, count: number }, { app }) {
      const withEvent: number[] = []
      const without: number[] = []
      const statementWithEvent: number[] = []
      const statementWithout: number[] = []
      const insert = (name: string) => Prisma.sql`INSERT INTO projects (id, "companyId", name, "updatedAt") VALUES (${randomUUID()}, ${companyId}, ${name}, now())`
      const stream = companyStream(companyId)
      for (let i = 0; i < count; i++) {
        let t = now()
        await app.eventLog.transaction(async (tx, publish) => {
          const project = await tx.project.create({ data: { companyId, name: `overhead ${i} with` } })
          await publish({ stream, type: 'project:created', companyId, actorId, data: { project } })
        })
        withEvent.push(now() - t)
        t = now()
        await app.prisma.$transaction(async (tx) => {
          await tx.project.create({ data: { companyId, name: `overhead ${i} without` } })
        })
        without.push(now() - t)
        t = now()
        await app.eventLog.commit({ writes: [insert(`statement ${i} with`)], event: { stream, type: 'project:deleted', companyId, actorId, data: { projectId: String(i) } } })
        statementWithEvent.push(now() - t)
        t = now()
        await app.prisma.$executeRaw(insert(`statement ${i} without`))
        statementWithout.push(now() - t)
      }
      return { withEvent, without, statementWithEvent, statementWithout }
    }
  },

  baselineCommands: {
    fill ({ count }: { count: number }, { store, room }) {
      const at = new Date().toISOString()
      store.set('replay', Array.from({ length: count }, (_, i) => ({
        id: `e${i}`, stream: room, seq: i + 1, type: 'project:created', companyId: 'bench', at, actor: { userId: 'bench' }, data: { project: sampleProject(i) }
      })))
      return { count }
    }
  },

  baselineConnection (socket, { store }) {
    socket.on('sync:resume', (_request: unknown, ack: (result: unknown) => void) => {
      const events = (store.get('replay') ?? []) as Array<{ type: string, stream: string, seq: number }>
      for (const event of events) socket.emit(event.type, event)
      const last = events[events.length - 1]
      ack({ ok: true, streams: { [last?.stream ?? 'none']: { recovered: true, replayed: events.length, headSeq: last?.seq ?? 0 } } })
    })
  },

  clientCommands: {
    /** Connects one socket, resumes `stream` from `lastSeq`, counts the events up to the ack. */
    async resume ({ url, token, stream, lastSeq, timeoutMs }: { url: string, token?: string, stream: string, lastSeq: number, timeoutMs: number }, { open }): Promise<ResumeResult> {
      const socket = await open(url, token ? { token } : undefined, 20_000)
      let received = 0
      let expected = lastSeq + 1
      let inOrder = true
      socket.onAny((_event: string, payload: { stream?: string, seq?: number }) => {
        if (payload?.stream !== stream) return
        if (payload.seq !== expected) inOrder = false
        expected = (payload.seq ?? expected) + 1
        received++
      })
      try {
        const started = now()
        const ack = await socket.timeout(timeoutMs).emitWithAck('sync:resume', { streams: { [stream]: lastSeq } })
        return { ms: now() - started, received, inOrder, ack }
      } finally {
        socket.disconnect()
      }
    }
  },

  async run (ctx) {
    const events = ctx.number('events', ctx.quick ? 2000 : 10_000)
    const batch = ctx.number('batch', 500)
    const overheadOps = ctx.number('ops', ctx.quick ? 100 : 300)
    const parameters = { events, publishBatch: batch, overheadOpsPerRep: overheadOps, reps: ctx.reps, pageSize: 500 }

    const db = await ctx.database()
    const company = await ctx.seed(db, 2)
    const [ours, raw, clients] = await Promise.all([ctx.startServer(db), ctx.startBaseline(), ctx.clients(1)])
    const [adminToken] = await ours.call<string[]>('tokens', { companyId: company.companyId, users: company.users })
    const actorId = company.users[0]!.id
    const stream = companyStream(company.companyId)
    await raw.call('replay:fill', { count: events })

    const reps = { ours: [] as Array<ResumeResult & { publishMs: number }>, raw: [] as ResumeResult[], overhead: [] as Overhead[] }
    for (let rep = 0, more = ctx.repetitions(); more(rep); rep++) {
      for (const kind of rep % 2 ? ['raw', 'ours'] as const : ['ours', 'raw'] as const) {
        if (kind === 'ours') {
          const lastSeq = await ours.call<number>('replay:head', { stream })
          const published = await ours.call<{ ms: number, head: number }>('replay:publish', { companyId: company.companyId, actorId, count: events, batch }, 300_000)
          const result = await clients.call<ResumeResult>('replay:resume', { url: ours.url, token: adminToken, stream, lastSeq, timeoutMs: 60_000 }, 90_000)
          if (result.received !== events || !result.inOrder || !result.ack.ok) throw new Error(`ours: replay received ${result.received}/${events}, in order: ${result.inOrder}, ack ${JSON.stringify(result.ack)}`)
          reps.ours.push({ ...result, publishMs: published.ms })
          ctx.log(`rep ${rep + 1} ours: published ${events} in ${round(published.ms, 0)} ms; replay ${round(result.ms, 1)} ms`)
        } else {
          const result = await clients.call<ResumeResult>('replay:resume', { url: raw.url, stream: 'company:bench', lastSeq: 0, timeoutMs: 60_000 }, 90_000)
          if (result.received !== events || !result.inOrder) throw new Error(`raw: replay received ${result.received}/${events}`)
          reps.raw.push(result)
          ctx.log(`rep ${rep + 1} raw: replay ${round(result.ms, 1)} ms`)
        }
      }
      const o = await ours.call<Record<keyof Overhead, number[]>>('replay:overhead', { companyId: company.companyId, actorId, count: overheadOps }, 300_000)
      const op = Object.fromEntries(Object.entries(o).map(([key, samples]) => [key, samplePercentiles(samples).p50])) as unknown as Overhead
      reps.overhead.push(op)
      ctx.log(`rep ${rep + 1} publish overhead: ${round(op.withEvent)} ms with event vs ${round(op.without)} ms without; one statement ${round(op.statementWithEvent)} vs ${round(op.statementWithout)} ms`)
    }

    const rows: Row[] = [{
      label: `replay ${events}`, metric: 'resume→ack', unit: 'ms', better: 'lower', summary: true,
      target: events === 10_000 ? { maxOurs: 1000 } : undefined,
      ...medians(reps.ours.map(r => r.ms), reps.raw.map(r => r.ms))
    }, {
      label: 'publish overhead', metric: 'median mutation', unit: 'ms', better: 'lower', summary: true, baselineName: 'no event',
      target: { maxRatio: 1.5 },
      ...medians(reps.overhead.map(o => o.withEvent), reps.overhead.map(o => o.without))
    }, {
      label: 'publish overhead', metric: 'median one-statement insert (eventLog.commit)', unit: 'ms', better: 'lower', summary: true, baselineName: 'the INSERT alone',
      ...medians(reps.overhead.map(o => o.statementWithEvent), reps.overhead.map(o => o.statementWithout))
    }]
    return {
      parameters,
      rows,
      raw: { ...reps, publishEventsPerSecond: median(reps.ours.map(r => events / (r.publishMs / 1000))) }
    }
  }
}
