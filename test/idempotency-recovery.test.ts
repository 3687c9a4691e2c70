import { randomUUID } from 'node:crypto'
import t, { type Test } from 'tap'
import type { FastifyInstance } from 'fastify'
import { Prisma } from '../src/generated/prisma/client.ts'
import { companyStream } from '../plugins/events.ts'
import { authHeader, build, createCompany, sleep, testDatabase, waitFor, type TestUser } from './helpers.ts'

// Two nodes on one database stand in for a process that died mid-request and the one the
// client retries on. The first node is kept alive but stalled, which is what a crash looks
// like from the outside, and lets the test release it to check the fence.
const LEASE = 1000

/** Where a node's handler waits: before its write, or after it (before answering). */
interface Gates { before?: Promise<void>, after?: Promise<void>, entered?: () => void }

function gate (): { wait: Promise<void>, open: () => void } {
  let open!: () => void
  const wait = new Promise<void>(resolve => { open = resolve })
  return { wait, open }
}

/** POST /test/create?via=commit|transaction: a project and its event through eventLog, with the node's gates. */
const gatedRoutes = (gates: Gates) => async (app: FastifyInstance) => {
  app.post<{ Querystring: { via: string }, Body: { name: string } }>('/test/create', { preHandler: app.authenticate }, async (request, reply) => {
    gates.entered?.()
    await gates.before
    const { companyId, userId } = request.user
    const project = { id: randomUUID(), companyId, name: request.body.name }
    const event = { stream: companyStream(companyId), type: 'project:created' as const, companyId, actorId: userId, data: { project } }
    if (request.query.via === 'commit') {
      await app.eventLog.commit({
        writes: [Prisma.sql`INSERT INTO projects (id, "companyId", name, "updatedAt") VALUES (${project.id}, ${companyId}, ${project.name}, now())`],
        event
      })
    } else {
      await app.eventLog.transaction(async (tx, publish) => {
        await tx.project.create({ data: project })
        await publish(event)
      })
    }
    await gates.after
    reply.code(201)
    return { project }
  })
}

async function twoNodes (t: Test, waitMs = 10_000) {
  const db = await testDatabase(t)
  const gates: { first: Gates, second: Gates } = { first: {}, second: {} }
  const realtime = { idempotency: { recoverAfterMs: LEASE, waitMs } }
  const first = await build(t, { db, realtime, routes: gatedRoutes(gates.first) })
  const second = await build(t, { db, realtime, routes: gatedRoutes(gates.second) })
  const company = await createCompany(first.app, ['member'])
  return { first: first.app, second: second.app, gates, user: company.as('member'), company }
}

const create = (app: FastifyInstance, user: TestUser, via: string, key: string) =>
  app.inject({ method: 'POST', url: `/test/create?via=${via}`, headers: { ...authHeader(user), 'idempotency-key': key }, payload: { name: `recovered ${key}` } })

const projectsNamed = (app: FastifyInstance, key: string) => app.prisma.project.count({ where: { name: `recovered ${key}` } })

for (const via of ['transaction', 'commit']) {
  t.test(`a claim whose request died before its ${via} is taken over after recoverAfterMs, and the first request can no longer write`, async t => {
    // waitMs 0: a retry answers at once instead of waiting (a waiting one would take over as
    // soon as the claim is stale).
    const { first, second, gates, user } = await twoNodes(t, 0)
    const stalled = gate()
    const entered = gate()
    gates.first.before = stalled.wait
    gates.first.entered = entered.open
    const original = create(first, user, via, `crash-before-${via}`)
    await entered.wait

    const early = await create(second, user, via, `crash-before-${via}`)
    t.equal(early.json().error?.code, 'IDEMPOTENCY_KEY_IN_PROGRESS', 'before recoverAfterMs a retry answers IN_PROGRESS')
    await sleep(LEASE + 50)
    const retry = await create(second, user, via, `crash-before-${via}`)
    t.equal(retry.statusCode, 201, 'after it, the retry takes the claim over and runs')

    stalled.open()
    const late = await original
    t.equal(late.statusCode, 409)
    t.equal(late.json().error.code, 'IDEMPOTENCY_KEY_TAKEN_OVER', 'the first request, released, is fenced out: its write commits nothing')
    t.equal(await projectsNamed(second, `crash-before-${via}`), 1, 'the change is applied once')
    t.equal(await first.prisma.event.count({ where: { type: 'project:created' } }), 1, 'and recorded once')

    const again = await create(first, user, via, `crash-before-${via}`)
    t.equal(again.statusCode, 201)
    t.equal(again.headers['idempotent-replayed'], 'true', 'later retries replay the response of the request that took over')
    t.same(again.json(), retry.json())
  })
}

t.test('a claim whose change committed but whose response was lost answers IDEMPOTENCY_KEY_RESPONSE_LOST after recoverAfterMs, and never runs again', async t => {
  const { first, second, gates, user } = await twoNodes(t)
  const stalled = gate()
  const entered = gate()
  gates.first.after = stalled.wait
  gates.first.entered = entered.open
  const original = create(first, user, 'commit', 'crash-after')
  await entered.wait
  await waitFor(async () => (await projectsNamed(first, 'crash-after')) === 1, 5000, 'the first request to commit')

  await sleep(LEASE + 50)
  const retry = await create(second, user, 'commit', 'crash-after')
  t.equal(retry.statusCode, 409)
  t.equal(retry.json().error.code, 'IDEMPOTENCY_KEY_RESPONSE_LOST', 'the retry learns the change was applied and its response lost')
  t.equal(await projectsNamed(second, 'crash-after'), 1, 'it did not run again')

  stalled.open()
  t.equal((await original).statusCode, 201, 'the first request, released, still answers')
  const again = await create(second, user, 'commit', 'crash-after')
  t.equal(again.headers['idempotent-replayed'], 'true', 'and its response is then replayed')
})

t.test('a request that commits after its claim went stale is not declared lost: the retry waits for its response', async t => {
  const { first, second, gates, user } = await twoNodes(t)
  const beforeWrite = gate()
  const beforeAnswer = gate()
  const entered = gate()
  gates.first.before = beforeWrite.wait
  gates.first.after = beforeAnswer.wait
  gates.first.entered = entered.open
  const original = create(first, user, 'transaction', 'slow-commit')
  await entered.wait
  await sleep(LEASE + 50)
  beforeWrite.open()
  await waitFor(async () => (await projectsNamed(first, 'slow-commit')) === 1, 5000, 'the first request to commit')

  const retry = create(second, user, 'transaction', 'slow-commit')
  await sleep(100)
  beforeAnswer.open()
  t.equal((await original).statusCode, 201)
  const replayed = await retry
  t.equal(replayed.statusCode, 201, 'the retry waited and replays the response')
  t.equal(replayed.headers['idempotent-replayed'], 'true')
  t.equal(await projectsNamed(second, 'slow-commit'), 1)
})

t.test('recoverAfterMs is validated', async t => {
  const db = await testDatabase(t)
  await t.rejects(build(t, { db, realtime: { idempotency: { recoverAfterMs: -1 } } }), /erp-idempotency: invalid option recoverAfterMs/)
})
