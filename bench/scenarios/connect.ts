import { randomBytes } from 'node:crypto'
import { sleep } from '../lib/clock.ts'
import type { ConnectResult, ServerHandle } from '../lib/context.ts'
import type { Memory } from '../lib/memory.ts'
import type { Row, Scenario } from '../lib/scenario.ts'
import { median, round } from '../lib/stats.ts'

/**
 * connect: N connections to one node, from two client processes at once. Ours: JWT verify +
 * membership query in PostgreSQL + joining company/user rooms. Baseline: no auth, one room.
 * Connections per second (first start → last connect), and server RSS per connection
 * (process.memoryUsage after a full GC, before and after, in a fresh server process per rep).
 */

interface Rep {
  connect: ConnectResult
  before: Memory
  after: Memory
  rssPerConnection: number
  heapPerConnection: number
}

export const connect: Scenario = {
  name: 'connect',
  description: '10,000 authenticated connections to one node (companies of 1 and of 100): connections/s and server RSS per connection',
  default: true,
  async run (ctx) {
    const total = ctx.number('connections', ctx.quick ? 1000 : 10_000)
    const concurrency = ctx.number('concurrency', 400)
    // Bounded: a rep stops connecting after this; the rate is then over the sockets it got.
    const deadlineMs = ctx.number('deadline', 90) * 1000
    // Users per company. Each user's first connection announces presence to its whole company,
    // so companies of N users cost N²/2 presence deliveries while connecting (parsed by the load
    // clients on the same cores); the raw baseline has no such traffic. 1: what the issue names
    // (JWT + membership check, joins, presence bookkeeping); 100: a multi-tenant node with that
    // fan-out; `--company-sizes 10000` is the worst case (one company).
    const companySizes = ctx.numbers('company-sizes', [1, 100]).map(size => Math.min(total, size))
    const parameters = { connections: total, companySizes, concurrency, clientProcesses: 2, reps: ctx.reps, freshServerPerRep: true, warmupConnections: Math.min(200, total), repDeadlineSeconds: deadlineMs / 1000 }

    const db = await ctx.database()
    // Warm-up users in a company of their own: their presence never reaches the measured sockets.
    const warmCompany = await ctx.seed(db, Math.min(200, total))
    const clients = await ctx.clients(2)
    // One key for every server process of the run, so the tokens are signed once.
    const jwtSecret = randomBytes(32).toString('hex')
    let warmTokens: string[] | undefined
    const rows: Row[] = []
    const raws: Record<string, unknown> = {}
    let failed = 0

    const measure = async (server: ServerHandle, group: string, connectTokens?: string[]): Promise<Rep> => {
      // Warm up first (pools, JIT, Prisma's engine memory), so the delta is per-connection cost.
      const warm = await clients.connect(`${group}-warm`, server.url, connectTokens ? { tokens: warmTokens, concurrency } : { count: warmCompany.users.length, concurrency })
      await clients.disconnect(`${group}-warm`)
      if (warm.failed || !(await server.waitForSockets(0))) throw new Error(`${server.kind}: warm-up failed ${JSON.stringify(warm.errors)}`)
      await sleep(500)
      const before = await server.memory()
      const result = await clients.connect(group, server.url, connectTokens ? { tokens: connectTokens, concurrency, deadlineMs } : { count: total, concurrency, deadlineMs })
      if (!(await server.waitForSockets(result.connected))) throw new Error(`${server.kind}: server does not hold ${result.connected} sockets`)
      await sleep(500)
      const after = await server.memory()
      await clients.disconnect(group)
      await server.stop()
      return {
        connect: result,
        before,
        after,
        rssPerConnection: (after.rss - before.rss) / result.connected,
        heapPerConnection: (after.heapUsed - before.heapUsed) / result.connected
      }
    }

    for (const companySize of companySizes) {
      const companies = await ctx.seedMany(db, Math.ceil(total / companySize), companySize)
      let tokens: string[] | undefined
      const reps: { ours: Rep[], raw: Rep[] } = { ours: [], raw: [] }
      for (let rep = 0; rep < ctx.reps; rep++) {
        for (const kind of rep % 2 ? ['raw', 'ours'] as const : ['ours', 'raw'] as const) {
          let result: Rep
          if (kind === 'ours') {
            const server = await ctx.startServer(db, { config: { jwtSecret } })
            if (!tokens) {
              tokens = (await server.call<string[][]>('tokensMany', companies)).flat()
              warmTokens = await server.call<string[]>('tokens', { companyId: warmCompany.companyId, users: warmCompany.users })
            }
            result = await measure(server, `ours-${rep}`, tokens)
          } else {
            result = await measure(await ctx.startBaseline(), `raw-${rep}`)
          }
          reps[kind].push(result)
          ctx.log(`companies of ${companySize}, rep ${rep + 1} ${kind}: ${result.connect.connected}/${total} in ${round((result.connect.endedAt - result.connect.startedAt) / 1000)} s = ${round(result.connect.rate, 0)}/s, RSS +${round(result.rssPerConnection / 1024, 1)} KB/conn${result.connect.failed ? `, failed ${JSON.stringify(result.connect.errors)}` : ''}`)
        }
      }

      const label = `connect ${total} (companies of ${companySize})`
      const series = (fn: (r: Rep) => number) => ({ ours: reps.ours.map(fn), baseline: reps.raw.map(fn) })
      const row = (metric: string, unit: string, better: Row['better'], fn: (r: Rep) => number, target?: Row['target'], summary = true): Row => {
        const s = series(fn)
        return { label, metric, unit, better, target, summary, ours: median(s.ours), baseline: median(s.baseline), reps: s }
      }
      rows.push(
        row('connections/s', '/s', 'higher', r => r.connect.rate, { minRatio: 0.5 }),
        row('RSS/connection', 'KB', 'lower', r => r.rssPerConnection / 1024, { maxRatio: 1.5 }),
        row('heap/connection', 'KB', 'lower', r => r.heapPerConnection / 1024, undefined, false)
      )
      failed += [...reps.ours, ...reps.raw].reduce((s, r) => s + r.connect.failed, 0)
      raws[companySize] = reps
    }
    return { parameters, rows, raw: raws, notes: failed ? [`${failed} connections failed`] : [] }
  }
}
