// Three real `src/server.ts` processes sharing one Redis (own key prefix) and one PostgreSQL
// database: a change made over HTTP on one node reaches that company's clients on every node,
// and nobody else.
import t from 'tap'
import { companyStream, userStream } from '../plugins/events.ts'
import { build, createCompany, testDatabase, uniqueName, waitFor, TEST_REDIS_URL } from './helpers.ts'
import { createProject, Follower, health, startNode } from './cluster-helpers.ts'

t.test('a change on node A reaches its company on A, B and C, and no other company', async (t) => {
  const db = await testDatabase(t)
  // In-process app on the same database: creates the companies and signs tokens (same JWT_SECRET).
  const { app } = await build(t, { db })
  const acme = await createCompany(app, ['admin', 'member', 'member', 'member'])
  const other = await createCompany(app, ['admin', 'member', 'member', 'member'])

  const env = { DATABASE_URL: db.url!, REDIS_URL: TEST_REDIS_URL, REDIS_PREFIX: uniqueName('erp_cluster') }
  const nodes = await Promise.all([startNode(t, env), startNode(t, env), startNode(t, env)])
  const [a, b, c] = nodes as [typeof nodes[0], typeof nodes[0], typeof nodes[0]]

  // All three see each other through Redis.
  await waitFor(async () => (await Promise.all(nodes.map(n => health(n.url)))).every(h => h.body.nodes === 3), 15_000, 'three nodes visible')
  for (const node of nodes) {
    const { statusCode, body } = await health(node.url)
    t.equal(statusCode, 200)
    t.match(body, { status: 'ok', nodes: 3, adapter: { type: 'redis', status: 'up' }, database: { status: 'up' } })
  }
  t.equal(new Set(await Promise.all(nodes.map(async n => (await health(n.url)).body.nodeId))).size, 3, 'each node has its own nodeId')

  // One member of each company on each node.
  const followers = (company: typeof acme) => nodes.map((node, i) => {
    const user = company.users[i + 1]!
    return new Follower(t, `${company.name}@${i}`, user.token, [companyStream(company.id), userStream(user.id)], [node.url])
  })
  const acmeClients = followers(acme)
  const otherClients = followers(other)
  await Promise.all([...acmeClients, ...otherClients].map(f => f.connect()))

  const project = await createProject(a.url, acme.as('admin').token, 'Tower')
  // Published after acme's event, on the same node: once it reaches the other company's
  // clients, acme's event has been handled by every node too (one Redis channel, in order).
  await createProject(a.url, other.as('admin').token, 'Bridge')
  await waitFor(() => [...acmeClients, ...otherClients].every(f => f.seqs.get(f.streams[0]!)!.length >= 1), 10_000, 'the events on every node')

  for (const follower of acmeClients) {
    t.same(follower.seqs.get(companyStream(acme.id)), [1], `${follower.name} got acme's event once`)
    t.same(follower.seqs.get(follower.streams[1]!), [], `${follower.name} got nothing on its user stream`)
  }
  for (const follower of otherClients) {
    t.same(follower.seqs.get(companyStream(other.id)), [1], `${follower.name} got only its own company's event`)
  }

  // Payload check on a remote node: the envelope crossed Redis intact.
  const received = await new Promise<any>((resolve) => {
    acmeClients[2]!.socket.once('project:updated', resolve)
    void fetch(`${b.url}/projects/${project.id}`, {
      method: 'PATCH',
      headers: { authorization: `Bearer ${acme.as('admin').token}`, 'content-type': 'application/json' },
      body: JSON.stringify({ baseVersion: 1, name: 'Tower II' })
    })
  })
  t.match(received, { stream: companyStream(acme.id), seq: 2, type: 'project:updated', companyId: acme.id, data: { project: { id: project.id, name: 'Tower II' } } })
  t.notOk(c.exited(), 'node C still running')
  await waitFor(() => acmeClients.every(f => f.seqs.get(companyStream(acme.id))!.length === 2), 5000, 'the update everywhere')
  for (const follower of otherClients) t.same(follower.seqs.get(companyStream(other.id)), [1], `${follower.name} saw nothing of acme's update`)
})
