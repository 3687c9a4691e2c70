// SIGKILL one of three real nodes while its clients are connected and the others keep
// publishing: the clients move to a surviving node, resume from their last seq, and end up
// with every event of their company once, in order.
import t from 'tap'
import { companyStream, userStream } from '../plugins/events.ts'
import { build, createCompany, sleep, testDatabase, uniqueName, waitFor, TEST_REDIS_URL } from './helpers.ts'
import { createProject, Follower, health, range, startNode } from './cluster-helpers.ts'

t.test('clients of a SIGKILLed node reconnect to a survivor, resume and miss nothing', async (t) => {
  const db = await testDatabase(t)
  const { app } = await build(t, { db })
  const acme = await createCompany(app, ['admin', ...Array<'member'>(7).fill('member')])
  const env = { DATABASE_URL: db.url!, REDIS_URL: TEST_REDIS_URL, REDIS_PREFIX: uniqueName('erp_failover'), SYNC_HEAD_INTERVAL_MS: '1000' }
  const [a, b, c] = await Promise.all([startNode(t, env), startNode(t, env), startNode(t, env)])
  await waitFor(async () => (await Promise.all([a, b, c].map(n => health(n.url)))).every(h => h.body.nodes === 3), 15_000, 'three nodes visible')

  const stream = companyStream(acme.id)
  const members = acme.users.slice(1)
  const follower = (i: number, urls: string[], failover: boolean) =>
    new Follower(t, `member${i}`, members[i]!.token, [stream, userStream(members[i]!.id)], urls, failover)
  // Three clients on C (the victim), fail over to A or B; two stay on each survivor.
  const victims = [follower(0, [c.url, a.url, b.url], true), follower(1, [c.url, b.url, a.url], true), follower(2, [c.url, a.url, b.url], true)]
  const survivors = [follower(3, [a.url], false), follower(4, [a.url], false), follower(5, [b.url], false), follower(6, [b.url], false)]
  const followers = [...victims, ...survivors]
  // Away long enough for events to be published meanwhile: the resume has something to replay.
  for (const victim of victims) victim.reconnectDelayMs = 300
  await Promise.all(followers.map(f => f.connect()))

  const admin = acme.as('admin').token
  let published = 0
  const publish = async (url: string) => {
    await createProject(url, admin, `p${published}`)
    published++
  }
  for (const url of [a.url, b.url, c.url, c.url]) await publish(url)
  await waitFor(() => followers.every(f => f.seqs.get(stream)!.length === published), 10_000, 'the events before the kill')

  // A and B keep publishing before, during and after the kill and the reconnects.
  let publishing = true
  const publisher = (async () => {
    for (let i = 0; publishing; i++) {
      await publish(i % 2 === 0 ? a.url : b.url)
      await sleep(20)
    }
  })()
  await waitFor(() => published >= 10, 10_000, 'publishing under way')
  await c.kill('SIGKILL')
  await waitFor(() => victims.every(v => v.reconnects === 1 && v.resumes.length === 1), 15_000, 'the victims to reconnect and resume')
  const afterResume = published
  await waitFor(() => published >= afterResume + 10, 10_000, 'publishing after the resumes')
  publishing = false
  await publisher

  await waitFor(() => followers.every(f => f.seqs.get(stream)!.length >= published), 15_000, 'every event everywhere')
  for (const victim of victims) {
    t.ok([a.url, b.url].includes(victim.url), `${victim.name} moved to a surviving node`)
    t.match(victim.resumes[0], { ok: true, streams: { [stream]: { recovered: true } } }, `${victim.name} resumed`)
    t.ok(victim.resumes[0].streams[stream].replayed > 0, `${victim.name} got the events it missed while away from the replay`)
  }
  for (const f of followers) t.same(f.seqs.get(stream), range(published), `${f.name}: every event once, in order`)

  for (const node of [a, b]) {
    t.notOk(node.exited(), 'survivor still running')
    await waitFor(async () => (await health(node.url)).body.nodes === 2, 10_000, 'the dead node to drop out of the count')
    t.match((await health(node.url)).body, { status: 'ok', nodes: 2 })
  }
})
