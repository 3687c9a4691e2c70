// Redis stopped and restarted under three real nodes while every node keeps publishing: no
// crash, health goes degraded and back to ok without a restart, and every client ends up
// holding every event of its company once, in order.
import t from 'tap'
import { companyStream, userStream } from '../plugins/events.ts'
import { build, createCompany, testDatabase, uniqueName, waitFor } from './helpers.ts'
import { createProject, dedicatedRedis, Follower, health, range, startNode, type NodeProcess } from './cluster-helpers.ts'

t.test('regression: a publish while Redis is down crashed the node (unhandled rejection from the adapter)', async (t) => {
  const db = await testDatabase(t)
  const { app } = await build(t, { db })
  const acme = await createCompany(app, ['admin', 'member', 'member', 'member', 'member', 'member', 'member'])
  const redis = await dedicatedRedis(t)
  // A short beacon: an idle node notices events it missed through Redis within half a second.
  const env = { DATABASE_URL: db.url!, REDIS_URL: redis.url, REDIS_PREFIX: uniqueName('erp_outage'), SYNC_HEAD_INTERVAL_MS: '500' }
  const nodes = await Promise.all([startNode(t, env), startNode(t, env), startNode(t, env)])
  const alive = (what: string) => {
    for (const [i, node] of nodes.entries()) t.notOk(node.exited(), `node ${i} still running ${what}`, { output: node.exited() ? node.output() : undefined })
  }
  const healths = () => Promise.all(nodes.map(node => health(node.url)))
  await waitFor(async () => (await healths()).every(h => h.body.status === 'ok' && h.body.nodes === 3), 15_000, 'three healthy nodes')

  const stream = companyStream(acme.id)
  const admin = acme.as('admin').token
  // Two members on each node.
  const followers = acme.users.slice(1).map((user, i) => new Follower(t, `member${i}@node${i % 3}`, user.token, [stream, userStream(user.id)], [nodes[i % 3]!.url]))
  await Promise.all(followers.map(f => f.connect()))
  const clientsOf = (node: NodeProcess) => followers.filter(f => f.url === node.url)
  const projectIds = (f: Follower) => new Set(f.events.map(e => e.data?.project?.id))

  let published = 0
  /** One project per node, concurrently; returns the project created on each node. */
  const round = async (name: string) => {
    const projects = await Promise.all(nodes.map((node, i) => createProject(node.url, admin, `${name} on ${i}`)))
    published += projects.length
    return projects
  }
  const everyoneHas = (n: number, what: string) => waitFor(() => followers.every(f => f.seqs.get(stream)!.length >= n), 15_000, what)

  await round('before')
  await everyoneHas(published, 'the events published before the outage')

  await redis.stop()
  await waitFor(async () => (await healths()).every(h => h.body.status === 'degraded'), 15_000, 'every node degraded')
  for (const { statusCode, body } of await healths()) {
    t.equal(statusCode, 200, 'a degraded node still serves')
    t.match(body, { status: 'degraded', nodes: 1, adapter: { type: 'redis', status: 'down' }, database: { status: 'up' } })
  }

  for (let i = 0; i < 3; i++) {
    const projects = await round(`outage ${i}`)
    // Local delivery does not wait on Redis: each node's own clients get its event at once.
    await waitFor(() => nodes.every((node, n) => clientsOf(node).every(f => projectIds(f).has(projects[n]!.id))), 5000, 'local delivery during the outage')
  }
  // Events of the other nodes reach everyone too: the beacon fills the gap from PostgreSQL.
  await everyoneHas(published, 'gap filling from the event log during the outage')
  alive('after publishing during the outage')
  for (const { body } of await healths()) t.equal(body.status, 'degraded', 'still degraded while Redis is down')

  await redis.start()
  await waitFor(async () => (await healths()).every(h => h.body.status === 'ok' && h.body.nodes === 3), 20_000, 'every node back to ok and subscribed again')
  for (const { body } of await healths()) t.match(body, { status: 'ok', nodes: 3, adapter: { status: 'up' } })

  for (let i = 0; i < 3; i++) await round(`after ${i}`)
  await everyoneHas(published, 'cross-node delivery after Redis returned')
  alive('after Redis returned')

  for (const follower of followers) {
    const ack = await follower.resume()
    t.same(ack.streams[stream], { recovered: true, replayed: 0, headSeq: published }, `${follower.name}: nothing left to replay`)
    t.same(follower.seqs.get(stream), range(published), `${follower.name}: every event once, in order`)
  }
})
