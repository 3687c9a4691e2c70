import { randomBytes } from 'node:crypto'
import { now, sleep } from '../lib/clock.ts'
import { openLoop, postProject } from '../lib/load.ts'
import { dropRedisPrefix } from '../lib/redis.ts'
import type { ClientPool, ServerHandle } from '../lib/context.ts'
import { medians, type Row, type Scenario } from '../lib/scenario.ts'
import { Histogram, round, type Percentiles } from '../lib/stats.ts'

/**
 * cluster: an HTTP change (POST /projects) on node A delivered to N clients of one company
 * spread evenly over three nodes sharing Redis (REDIS_URL, own key prefix) and PostgreSQL,
 * against the same load on a single node (no Redis: the plain one-node deployment), in the
 * same run. Latency = client receipt - request start. Issue 7's target: cluster p99 within 2x.
 */

interface Burst {
  sent: number
  httpErrors: number
  expected: number
  received: number
  latency: Percentiles
  http: Percentiles
}

const REDIS_URL = process.env.BENCH_REDIS_URL ?? process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'

/** `count` changes on `target` at `rate`/s (open loop), received by `groups` of `clients`. */
async function burst (target: ServerHandle, clients: ClientPool, groups: string[], token: string, size: number, count: number, rate: number): Promise<Burst> {
  const { interval, http, httpErrors } = await openLoop(count, rate, t0 => postProject(target.url, token, t0))
  const expected = (count - httpErrors) * size
  const deadline = now() + 10_000 + count * interval
  let received = 0
  while (now() < deadline) {
    received = (await Promise.all(groups.map(g => clients.count(g)))).reduce((a, b) => a + b, 0)
    if (received >= expected) break
    await sleep(100)
  }
  const latency = new Histogram()
  received = 0
  for (const group of groups) {
    const got = await clients.collect(group)
    received += got.received
    const series = got.series.request
    if (series) latency.merge(series)
  }
  return { sent: count, httpErrors, expected, received, latency: latency.percentiles(), http: http.percentiles() }
}

export const cluster: Scenario = {
  name: 'cluster',
  description: 'HTTP change on node A to 1,000 clients over three Redis-linked nodes vs the same load on one node',
  default: true,
  flags: '--clients 1000 --emits 100 --warmup 20 --rate 50',
  budgetSeconds: 50,
  async run (ctx) {
    const size = ctx.number('clients', ctx.quick ? 300 : 1000)
    const emits = ctx.number('emits', ctx.quick ? 40 : 100)
    const warmup = ctx.number('warmup', ctx.quick ? 10 : 20)
    const rate = ctx.number('rate', 50)
    const redisPrefix = `erp_bench_${randomBytes(4).toString('hex')}`
    // Runs after the nodes stop (cleanups run last first): their presence keys go too.
    ctx.onCleanup(() => dropRedisPrefix(REDIS_URL, redisPrefix))
    const parameters = { clients: size, nodes: 3, emitsPerRep: emits, warmupEmits: warmup, rate, reps: ctx.reps, route: 'POST /projects on node A', redis: REDIS_URL.replace(/\/\/[^@]*@/, '//***@'), singleNode: 'memory adapter', clientProcesses: 2 }

    // The single node gets a database of its own: sharing the cluster's would make it see the
    // cluster's events as a gap in its company stream, fill it from the log and deliver them to
    // its clients seconds late (extra receipts, a p99 of seconds for the baseline).
    const [db, singleDb] = await Promise.all([ctx.database(), ctx.database()])
    const [company, singleCompany] = await Promise.all([ctx.seed(db, size + 1), ctx.seed(singleDb, size + 1)])
    // One JWT secret for every node, so a token from any node is valid on all of them.
    const jwtSecret = randomBytes(32).toString('hex')
    const clusterConfig = { config: { jwtSecret, redisUrl: REDIS_URL, redisPrefix } }
    const [a, b, c, single, clients] = await Promise.all([
      ctx.startServer(db, clusterConfig), ctx.startServer(db, clusterConfig), ctx.startServer(db, clusterConfig),
      ctx.startServer(singleDb, { config: { jwtSecret } }),
      ctx.clients(2)
    ])
    const nodes = [a, b, c]
    const tokens: string[] = await a.call('tokens', { companyId: company.companyId, users: company.users })
    const admin = tokens[0]!
    const members = tokens.slice(1, size + 1)
    const singleTokens: string[] = await single.call('tokens', { companyId: singleCompany.companyId, users: singleCompany.users })

    ctx.log(`${size} clients over 3 nodes: connecting`)
    const clusterGroups = nodes.map((_, i) => `cluster-${i}`)
    for (const [i, node] of nodes.entries()) {
      const part = members.slice(Math.floor(size * i / 3), Math.floor(size * (i + 1) / 3))
      const result = await clients.connect(clusterGroups[i]!, node.url, { tokens: part, deadlineMs: 300_000 })
      if (result.failed) throw new Error(`connect to node ${i} failed: ${JSON.stringify(result.errors)}`)
      await clients.listen(clusterGroups[i]!, 'project:created', 'project-name')
    }
    ctx.log(`${size} clients on the single node: connecting`)
    const singleResult = await clients.connect('single', single.url, { tokens: singleTokens.slice(1, size + 1), deadlineMs: 300_000 })
    if (singleResult.failed) throw new Error(`connect to the single node failed: ${JSON.stringify(singleResult.errors)}`)
    await clients.listen('single', 'project:created', 'project-name')

    const reps: { cluster: Burst[], single: Burst[] } = { cluster: [], single: [] }
    for (let rep = 0, more = ctx.repetitions(); more(rep); rep++) {
      // Alternate who goes first, so drift in machine speed hits both sides alike.
      for (const side of rep % 2 ? ['single', 'cluster'] as const : ['cluster', 'single'] as const) {
        const target = side === 'cluster' ? a : single
        const groups = side === 'cluster' ? clusterGroups : ['single']
        const token = side === 'cluster' ? admin : singleTokens[0]!
        await burst(target, clients, groups, token, size, warmup, rate)
        const result = await burst(target, clients, groups, token, size, emits, rate)
        reps[side].push(result)
        ctx.log(`rep ${rep + 1} ${side}: p50 ${round(result.latency.p50)} p99 ${round(result.latency.p99)} ms (HTTP p50 ${round(result.http.p50)} ms), ${result.received}/${result.expected} received, ${result.httpErrors} HTTP errors`)
      }
    }
    for (const group of [...clusterGroups, 'single']) await clients.disconnect(group)

    const pick = (bursts: Burst[], key: keyof Percentiles) => bursts.map(b => b.latency[key])
    const row = (metric: 'p50' | 'p99' | 'max', summary: boolean, target?: Row['target']): Row => ({
      label: `cluster ${size}`, metric, unit: 'ms', better: 'lower', summary, target, baselineName: 'single node',
      ...medians(pick(reps.cluster, metric), pick(reps.single, metric))
    })
    const rows = [row('p50', false), row('p99', true, { maxRatio: 2 }), row('max', false)]
    const lost = [...reps.cluster, ...reps.single].reduce((s, b) => s + b.expected - b.received + b.httpErrors, 0)
    const notes = lost > 0 ? [`${lost} deliveries or requests missing`] : []
    for (const note of notes) ctx.log(note)
    return { parameters, rows, raw: reps, notes }
  }
}
