import t, { type Test } from 'tap'
import { Readable } from 'node:stream'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import { companyStream } from '../plugins/events.ts'
import { buildApp } from '../src/app.ts'
import type { ErpIdempotencyOptions } from '../plugins/idempotency/index.ts'
import { authHeader, build, createCompany, sleep, testConfig, testDatabase, waitFor, type TestUser } from './helpers.ts'

const key = (k: string) => ({ 'idempotency-key': k })

const createProject = (app: FastifyInstance, user: TestUser, k: string | undefined, payload: Record<string, unknown> = { name: 'Outbox project' }) =>
  app.inject({ method: 'POST', url: '/projects', headers: { ...authHeader(user), ...(k === undefined ? {} : key(k)) }, payload })

async function projectEvents (app: FastifyInstance) {
  return await app.prisma.event.findMany({ where: { type: 'project:created' } })
}

/**
 * An app with extra routes that misbehave on purpose (5xx, slow, streamed, text), built
 * without listening so routes can be added after the plugins.
 */
async function appWithTestRoutes (t: Test, idempotency: Omit<ErpIdempotencyOptions, 'prisma'> = {}) {
  const db = await testDatabase(t)
  const app = await buildApp({ config: testConfig(), db, realtime: { idempotency, eventLog: { headIntervalMs: 0, pruneIntervalMs: 0 } } })
  t.teardown(() => app.close())
  const calls: Record<string, number> = {}
  const count = (name: string) => (calls[name] = (calls[name] ?? 0) + 1)
  await app.register(async (scope) => {
    scope.addHook('preHandler', scope.authenticate)
    scope.post('/test/flaky', async () => {
      if (count('flaky') === 1) throw new Error('first attempt fails')
      return { attempt: calls.flaky }
    })
    scope.post('/test/slow', async () => {
      count('slow')
      await sleep(300)
      return { slow: calls.slow }
    })
    scope.post('/test/text', async (_request, reply) => {
      count('text')
      reply.type('text/plain; charset=utf-8')
      return `call ${calls.text}`
    })
    scope.post('/test/binary', async (_request, reply) => {
      count('binary')
      reply.type('application/octet-stream')
      return Buffer.from([0x25, 0x50, 0x44, 0x46, 0xe2, 0xe3, 0xcf, 0xd3, 0xff, 0x00, calls.binary!])
    })
    scope.post('/test/nul-text', async (_request, reply) => {
      count('nul-text')
      reply.type('text/plain; charset=utf-8')
      return `a\u0000b call ${calls['nul-text']}`
    })
    scope.post('/test/empty', async (_request, reply) => {
      count('empty')
      return reply.code(204).send()
    })
    scope.post('/test/stream', async (_request, reply) => {
      count('stream')
      reply.type('application/octet-stream')
      return Readable.from(['a', 'b'])
    })
    scope.post('/test/exempt', { config: { idempotency: false } }, async () => ({ exempt: count('exempt') }))
    // Its change commits, then the answer fails (in production: the COMMIT's acknowledgement
    // lost to a connection reset or a failover) or is streamed.
    const commitChange = (request: FastifyRequest, name: string) => app.eventLog.transaction(async (_tx, publish) => {
      const { companyId, userId } = request.user
      await publish({ stream: companyStream(companyId), type: 'notification:new', companyId, actorId: userId, data: { kind: name, message: `call ${count(name)}` } })
    })
    scope.post('/test/commits-then-fails', async (request) => {
      await commitChange(request, 'commits-then-fails')
      throw new Error('connection reset after COMMIT')
    })
    scope.post('/test/commits-then-streams', async (request, reply) => {
      await commitChange(request, 'commits-then-streams')
      reply.type('application/octet-stream')
      return Readable.from(['a', 'b'])
    })
    scope.post('/test/store-fails', async () => {
      count('store-fails')
      // The response cannot be stored: the claim must stay, so a retry does not run again.
      await app.prisma.$executeRawUnsafe('ALTER TABLE idempotency_records RENAME TO idempotency_records_away')
      return { stored: false }
    })
  })
  await app.ready()
  const company = await createCompany(app, ['manager', 'member'])
  return { app, calls, company, user: company.as('manager') }
}

t.test('a sequential retry with the same key and body returns the first response unchanged and changes nothing', async t => {
  const { app, prisma } = await build(t)
  const user = (await createCompany(app)).as('manager')
  const first = await createProject(app, user, 'outbox-1')
  t.equal(first.statusCode, 201)
  t.notOk(first.headers['idempotent-replayed'])
  for (let i = 0; i < 3; i++) {
    const retry = await createProject(app, user, 'outbox-1')
    t.equal(retry.statusCode, 201)
    t.equal(retry.body, first.body, 'byte for byte the first body')
    t.equal(retry.headers['content-type'], first.headers['content-type'])
    t.equal(retry.headers['idempotent-replayed'], 'true')
  }
  t.equal(await prisma.project.count(), 1)
  t.equal((await projectEvents(app)).length, 1)
  // The same body serialised in another key order is the same request.
  const reordered = await app.inject({ method: 'POST', url: '/projects', headers: { ...authHeader(user), ...key('k2'), 'content-type': 'application/json' }, payload: '{"budgetMinor":5,"name":"x"}' })
  const reorderedRetry = await app.inject({ method: 'POST', url: '/projects', headers: { ...authHeader(user), ...key('k2'), 'content-type': 'application/json' }, payload: '{"name":"x","budgetMinor":5}' })
  t.equal(reorderedRetry.body, reordered.body)
  t.equal(await prisma.project.count(), 2)
})

t.test('concurrent retries with one key: exactly one executes; all get the identical response', async t => {
  const { app, prisma } = await build(t)
  const user = (await createCompany(app)).as('member')
  const responses = await Promise.all(Array.from({ length: 20 }, () => createProject(app, user, 'burst')))
  t.same(new Set(responses.map(r => r.statusCode)), new Set([201]))
  t.equal(new Set(responses.map(r => r.body)).size, 1, 'one body')
  t.equal(responses.filter(r => !r.headers['idempotent-replayed']).length, 1, 'one executed, the rest replayed')
  t.equal(await prisma.project.count(), 1)
  t.equal((await projectEvents(app)).length, 1)
  t.equal(await prisma.idempotencyRecord.count(), 1)
})

t.test('concurrent PATCH retries with one key apply once, and a stored 409 replays without a second conflict event', async t => {
  const { app, prisma } = await build(t)
  const company = await createCompany(app)
  const user = company.as('manager')
  const project = (await createProject(app, user, undefined)).json().project
  const edit = (k: string, payload: Record<string, unknown>) =>
    app.inject({ method: 'PATCH', url: `/projects/${project.id}`, headers: { ...authHeader(user), ...key(k) }, payload })
  const responses = await Promise.all(Array.from({ length: 10 }, () => edit('rename', { baseVersion: 1, name: 'Renamed' })))
  t.ok(responses.every(r => r.statusCode === 200 && r.body === responses[0]!.body))
  t.equal((await prisma.project.findUniqueOrThrow({ where: { id: project.id } })).version, 2)
  t.equal(await prisma.event.count({ where: { type: 'project:updated' } }), 1)

  const conflict = await edit('stale', { baseVersion: 1, name: 'Other' })
  t.equal(conflict.statusCode, 409)
  const replay = await edit('stale', { baseVersion: 1, name: 'Other' })
  t.equal(replay.statusCode, 409)
  t.equal(replay.body, conflict.body)
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.equal(await prisma.event.count({ where: { type: 'conflict:detected' } }), 1)
})

t.test('the same key with a different body, method or URL answers 422 IDEMPOTENCY_KEY_REUSED', async t => {
  const { app, prisma } = await build(t)
  const user = (await createCompany(app)).as('manager')
  await createProject(app, user, 'once', { name: 'A' })
  const other = await createProject(app, user, 'once', { name: 'B' })
  t.equal(other.statusCode, 422)
  t.equal(other.json().error.code, 'IDEMPOTENCY_KEY_REUSED')
  const otherUrl = await app.inject({ method: 'POST', url: '/stock/items', headers: { ...authHeader(user), ...key('once') }, payload: { name: 'A' } })
  t.equal(otherUrl.statusCode, 422)
  t.equal(await prisma.project.count(), 1)
})

// Regression (HTTP review): the request hash left If-Match out, so a retry of a 409 with a newer
// If-Match and the same key replayed the stale 409, while the same change with baseVersion in
// the body answered 422.
t.test('the same key with a different If-Match answers 422 IDEMPOTENCY_KEY_REUSED; the same If-Match replays', async t => {
  const { app } = await build(t)
  const user = (await createCompany(app)).as('manager')
  const project = (await createProject(app, user, undefined, { name: 'A' })).json().project
  await app.inject({ method: 'PATCH', url: `/projects/${project.id}`, headers: { ...authHeader(user), 'if-match': '"1"' }, payload: { name: 'B' } })
  const patch = (ifMatch: string) => app.inject({ method: 'PATCH', url: `/projects/${project.id}`, headers: { ...authHeader(user), ...key('stale'), 'if-match': ifMatch }, payload: { name: 'C' } })
  const stale = await patch('"1"')
  t.equal(stale.statusCode, 409, 'the stale version conflicts')
  for (const form of [' "1" ', 'W/"1"', '1']) {
    const same = await patch(form)
    t.equal(same.statusCode, 409)
    t.equal(same.headers['idempotent-replayed'], 'true', `the same version (${form}) replays`)
  }
  const newer = await patch('"2"')
  t.equal(newer.statusCode, 422)
  t.equal(newer.json().error.code, 'IDEMPOTENCY_KEY_REUSED', 'not the stored 409 for another version')
})

// A record stored before If-Match was hashed (the body alone) still answers the retry of its request.
t.test('a record hashed without If-Match still replays for a retry that sends one', async t => {
  const { app, prisma } = await build(t)
  const user = (await createCompany(app)).as('manager')
  const project = (await createProject(app, user, undefined, { name: 'A' })).json().project
  const patch = (headers: Record<string, string>) => app.inject({ method: 'PATCH', url: `/projects/${project.id}`, headers: { ...authHeader(user), ...key('older'), ...headers }, payload: { name: 'B', baseVersion: 1 } })
  const first = await patch({})
  t.equal(first.statusCode, 200)
  const retry = await patch({ 'if-match': '"1"' })
  t.equal(retry.headers['idempotent-replayed'], 'true')
  t.equal(retry.body, first.body)
  t.equal((await prisma.project.findUniqueOrThrow({ where: { id: project.id } })).version, 2, 'applied once')
})

t.test('keys are scoped per user and company', async t => {
  const { app, prisma } = await build(t)
  const company = await createCompany(app, ['manager', 'member'])
  const stranger = (await createCompany(app, ['manager'])).as('manager')
  for (const user of [company.as('manager'), company.as('member'), stranger]) {
    const res = await createProject(app, user, 'shared-key')
    t.equal(res.statusCode, 201)
    t.notOk(res.headers['idempotent-replayed'])
  }
  t.equal(await prisma.project.count(), 3)
})

t.test('a malformed key answers 400 IDEMPOTENCY_KEY_INVALID and changes nothing', async t => {
  const { app, prisma } = await build(t)
  const user = (await createCompany(app)).as('manager')
  for (const bad of ['', 'has space', 'x'.repeat(256), 'naïve']) {
    const res = await createProject(app, user, bad)
    t.equal(res.statusCode, 400, JSON.stringify(bad))
    t.equal(res.json().error.code, 'IDEMPOTENCY_KEY_INVALID')
  }
  t.equal((await createProject(app, user, 'x'.repeat(255))).statusCode, 201, '255 visible characters are fine')
  t.equal(await prisma.project.count(), 1)
})

t.test('unauthenticated requests and GETs are not covered', async t => {
  const { app, prisma } = await build(t)
  const user = (await createCompany(app)).as('manager')
  const unauthenticated = await app.inject({ method: 'POST', url: '/projects', headers: key('anon'), payload: { name: 'x' } })
  t.equal(unauthenticated.statusCode, 401)
  const login = await app.inject({ method: 'POST', url: '/auth/login', headers: key('login'), payload: { email: user.email, password: 'wrong' } })
  t.equal(login.statusCode, 401)
  const list = await app.inject({ method: 'GET', url: '/projects', headers: { ...authHeader(user), ...key('get') } })
  t.equal(list.statusCode, 200)
  t.equal(await prisma.idempotencyRecord.count(), 0)
})

t.test('an expired record no longer replays: the request runs again; prune() removes expired records in batches', async t => {
  const { app, prisma } = await build(t, { realtime: { idempotency: { pruneIntervalMs: 0, pruneBatchSize: 2 } } })
  const user = (await createCompany(app)).as('manager')
  const first = await createProject(app, user, 'old')
  await prisma.$executeRaw`UPDATE idempotency_records SET "expiresAt" = "expiresAt" - interval '2 days'`
  const again = await createProject(app, user, 'old')
  t.equal(again.statusCode, 201)
  t.not(again.json().project.id, first.json().project.id)
  t.equal(await prisma.project.count(), 2)

  for (let i = 0; i < 5; i++) await createProject(app, user, `k${i}`, { name: `p${i}` })
  await prisma.$executeRaw`UPDATE idempotency_records SET "expiresAt" = "expiresAt" - interval '2 days'`
  t.equal(await app.idempotency.prune(), 6)
  t.equal(await app.idempotency.prune(), 0)
})

t.test('the background job prunes expired records', async t => {
  const { app, prisma } = await build(t, { realtime: { idempotency: { pruneIntervalMs: 20, ttlSeconds: 1 } } })
  const user = (await createCompany(app)).as('manager')
  await createProject(app, user, 'short-lived')
  t.equal(await prisma.idempotencyRecord.count(), 1)
  await waitFor(async () => (await prisma.idempotencyRecord.count()) === 0, 5000, 'pruning')
  t.pass('expired record pruned')
})

t.test('a 5xx releases the key: the retry executes and its response is then stored', async t => {
  const { app, calls, user } = await appWithTestRoutes(t)
  const post = (url: string, k = 'k') => app.inject({ method: 'POST', url, headers: { ...authHeader(user), ...key(k) }, payload: { a: 1 } })
  t.equal((await post('/test/flaky')).statusCode, 500)
  const second = await post('/test/flaky')
  t.equal(second.statusCode, 200)
  t.same(second.json(), { attempt: 2 })
  const third = await post('/test/flaky')
  t.equal(third.body, second.body)
  t.equal(calls.flaky, 2)
})

t.test('regression: a 5xx after the change committed released the key and the retry applied the change twice', async t => {
  const { app, calls, user } = await appWithTestRoutes(t)
  for (const url of ['/test/commits-then-fails', '/test/commits-then-streams']) {
    const post = () => app.inject({ method: 'POST', url, headers: { ...authHeader(user), ...key(url) }, payload: {} })
    await post()
    const retry = await post()
    t.equal(retry.statusCode, 409, url)
    t.equal(retry.json().error.code, 'IDEMPOTENCY_KEY_RESPONSE_LOST', `${url}: the retry is told the change was applied`)
    t.equal(retry.headers['idempotent-replayed'], 'true')
    t.equal(calls[url.slice('/test/'.length)], 1, `${url}: the handler ran once`)
  }
  t.equal(await app.prisma.event.count({ where: { type: 'notification:new' } }), 2, 'one committed change per key')
})

t.test('regression: at shutdown a retry waiting for the first request held the HTTP drain until its connection was cut', async t => {
  let release!: () => void
  const released = new Promise<void>(resolve => { release = resolve })
  t.teardown(() => release())
  const { app, url } = await build(t, {
    drainTimeoutMs: 30_000,
    routes: async (scope) => {
      scope.addHook('preHandler', scope.authenticate)
      scope.post('/test/blocked', async () => { await released; return { done: true } })
    }
  })
  const user = (await createCompany(app, ['manager'])).as('manager')
  const post = () => fetch(`${url}/test/blocked`, {
    method: 'POST', headers: { ...authHeader(user), ...key('held'), 'content-type': 'application/json' }, body: '{}'
  })
  let received = 0
  app.server.on('request', () => { received++ })
  const first = post()
  // Conditions, not fixed sleeps: had the retry claimed the key first (the first request slower
  // than 100 ms to its claim), it would run the blocked handler itself; and a retry not yet
  // received when close starts gets no answer at all instead of waiting.
  await waitFor(async () => (await app.prisma.idempotencyRecord.count({ where: { userId: user.id, key: 'held' } })) === 1, 10_000, 'the first request to claim the key')
  const retry = post()
  await waitFor(() => received === 2, 10_000, 'the retry to reach the server')
  await sleep(100) // on its way to waiting for the first request's answer
  const closing = app.close()
  const started = Date.now()
  const answer = await retry
  t.ok(Date.now() - started < 1000, `the waiting retry answers within a poll interval of the close (${Date.now() - started} ms), not when the drain cuts it`)
  t.equal(answer.status, 409)
  t.equal(((await answer.json()) as { error: { code: string } }).error.code, 'IDEMPOTENCY_KEY_IN_PROGRESS')
  t.equal(answer.headers.get('connection'), 'close')
  release()
  t.equal((await first).status, 200, 'the first request still finishes in the drain')
  await closing
})

t.test('a retry during the first request waits for its response; with waitMs 0 it answers 409 IDEMPOTENCY_KEY_IN_PROGRESS', async t => {
  const waiting = await appWithTestRoutes(t)
  const post = (app: FastifyInstance, user: TestUser) => app.inject({ method: 'POST', url: '/test/slow', headers: { ...authHeader(user), ...key('slow') }, payload: {} })
  const [a, b] = await Promise.all([post(waiting.app, waiting.user), sleep(50).then(() => post(waiting.app, waiting.user))])
  t.equal(a.statusCode, 200)
  t.equal(b.body, a.body)
  t.equal(waiting.calls.slow, 1)

  const impatient = await appWithTestRoutes(t, { waitMs: 0 })
  // The second request once the first holds the key (its handler runs only after the claim):
  // after a fixed 50 ms, a first request slow to its claim let the second claim it, and the
  // answers came swapped (c 409, d 200).
  const [c, d] = await Promise.all([post(impatient.app, impatient.user),
    waitFor(() => impatient.calls.slow === 1, 10_000, 'the first request in its handler').then(() => post(impatient.app, impatient.user))])
  t.equal(c.statusCode, 200)
  t.equal(d.statusCode, 409)
  t.equal(d.json().error.code, 'IDEMPOTENCY_KEY_IN_PROGRESS')
  t.equal(impatient.calls.slow, 1)
})

t.test('non-JSON responses: text and empty bodies replay exactly; streams release the key; exempt routes run every time', async t => {
  const { app, calls, user } = await appWithTestRoutes(t)
  const post = (url: string) => app.inject({ method: 'POST', url, headers: { ...authHeader(user), ...key(url) }, payload: {} })
  const text = await post('/test/text')
  const textAgain = await post('/test/text')
  t.equal(textAgain.body, 'call 1')
  t.equal(textAgain.headers['content-type'], text.headers['content-type'])
  const empty = await post('/test/empty')
  const emptyAgain = await post('/test/empty')
  t.equal(empty.statusCode, 204)
  t.equal(emptyAgain.statusCode, 204)
  t.equal(emptyAgain.body, '')
  t.equal(calls.text, 1)
  t.equal(calls.empty, 1)

  t.equal((await post('/test/stream')).body, 'ab')
  t.equal((await post('/test/stream')).body, 'ab')
  t.equal(calls.stream, 2, 'a streamed response is not stored')
  await post('/test/exempt')
  await post('/test/exempt')
  t.equal(calls.exempt, 2)
  t.equal(await app.prisma.idempotencyRecord.count({ where: { key: { in: ['/test/stream', '/test/exempt'] } } }), 0)
})

// Regression (review): a Buffer was stored as UTF-8 text (invalid bytes replaced, so the replay
// differed), and text with a NUL failed the jsonb write, leaving the key IN_PROGRESS for its TTL.
t.test('binary bodies and text with a NUL replay byte for byte', async t => {
  const { app, calls, user } = await appWithTestRoutes(t)
  const post = (url: string) => app.inject({ method: 'POST', url, headers: { ...authHeader(user), ...key(url) }, payload: {} })
  const binary = await post('/test/binary')
  const binaryAgain = await post('/test/binary')
  t.equal(binaryAgain.headers['idempotent-replayed'], 'true')
  t.equal(binaryAgain.rawPayload.toString('hex'), binary.rawPayload.toString('hex'))
  t.equal(binary.rawPayload.toString('hex'), '25504446e2e3cfd3ff0001')
  t.equal(binaryAgain.headers['content-type'], 'application/octet-stream')
  const text = await post('/test/nul-text')
  const textAgain = await post('/test/nul-text')
  t.equal(textAgain.statusCode, 200)
  t.equal(textAgain.headers['idempotent-replayed'], 'true')
  t.equal(textAgain.body, 'a\u0000b call 1')
  t.equal(textAgain.headers['content-type'], text.headers['content-type'])
  t.same([calls.binary, calls['nul-text']], [1, 1], 'each ran once')
})

t.test('a response that cannot be stored keeps the claim: the retry is not run a second time', async t => {
  const { app, calls, user } = await appWithTestRoutes(t, { waitMs: 100 })
  const post = () => app.inject({ method: 'POST', url: '/test/store-fails', headers: { ...authHeader(user), ...key('fragile') }, payload: {} })
  const first = await post()
  t.equal(first.statusCode, 200, 'the client still gets the response')
  await app.prisma.$executeRawUnsafe('ALTER TABLE idempotency_records_away RENAME TO idempotency_records')
  const retry = await post()
  t.equal(retry.statusCode, 409)
  t.equal(retry.json().error.code, 'IDEMPOTENCY_KEY_IN_PROGRESS')
  t.equal(calls['store-fails'], 1)
})

t.test('invalid options stop the registration with a message naming the option', async t => {
  const db = await testDatabase(t)
  await t.rejects(
    buildApp({ config: testConfig(), db, realtime: { idempotency: { ttlSeconds: 0 } } }),
    /erp-idempotency: invalid option ttlSeconds/
  )
})

// Regression (security review): the body is hashed by a recursive function before the route
// validates it, so a body nested 100,000 levels deep with an Idempotency-Key overflowed the stack:
// a 500 (and an error log) per request, where the same body without the key got its 400.
t.test('a body nested too deeply for hashing answers 400, with or without an Idempotency-Key', async t => {
  const { app } = await build(t)
  const company = await createCompany(app, ['admin'])
  const deep = '['.repeat(100_000) + ']'.repeat(100_000)
  for (const headers of [key('deep-body'), {}]) {
    const res = await app.inject({ method: 'POST', url: '/projects', headers: { ...authHeader(company.as('admin')), ...headers, 'content-type': 'application/json' }, payload: deep })
    t.equal(res.statusCode, 400, JSON.stringify(headers))
    t.equal(res.json().error.code, 'VALIDATION_FAILED')
  }
  t.equal(await app.prisma.idempotencyRecord.count(), 0, 'nothing claimed')
})
