import { createHmac } from 'node:crypto'
import t from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import {
  authHeader, build, connect, connectError, createCompany, nextEvent, record, request, sleep, TEST_JWT_SECRET, testDatabase, waitFor
} from './helpers.ts'
import { erpAuth, erpOfflineQueue, erpSocket } from '../plugins/index.ts'
import { companyStream, userStream } from '../plugins/events.ts'

const b64url = (value: unknown) => Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url')

/** Builds a JWT by hand, so tests can produce tokens the app would never issue. */
function jwt (header: Record<string, unknown>, payload: Record<string, unknown>, secret: string | null = TEST_JWT_SECRET): string {
  const head = `${b64url(header)}.${b64url(payload)}`
  if (secret === null) return `${head}.`
  const algorithm = header.alg === 'HS512' ? 'sha512' : 'sha256'
  return `${head}.${createHmac(algorithm, secret).update(head).digest('base64url')}`
}

const now = () => Math.floor(Date.now() / 1000)

t.test('socket handshake rejections reach a real client as connect_error codes', async t => {
  const { app, url, prisma } = await build(t)
  const acme = await createCompany(app)
  const admin = acme.as('admin')
  const claims = { sub: admin.id, companyId: acme.id, role: 'admin' }

  t.test('AUTH_MISSING_TOKEN without a token', async t => {
    const err = await connectError(t, url, undefined)
    t.equal(err.data?.code, 'AUTH_MISSING_TOKEN')
    t.type(err.data?.message, 'string')
    const empty = await connectError(t, url, '')
    t.equal(empty.data?.code, 'AUTH_MISSING_TOKEN', 'an empty auth.token counts as missing')
  })

  t.test('AUTH_INVALID_TOKEN for a token signed with another key', async t => {
    const forged = jwt({ alg: 'HS256', typ: 'JWT' }, { ...claims, iat: now(), exp: now() + 600 }, 'another-secret-that-is-at-least-32-characters')
    const err = await connectError(t, url, forged)
    t.equal(err.data?.code, 'AUTH_INVALID_TOKEN')
  })

  t.test('AUTH_INVALID_TOKEN for an alg:none token', async t => {
    const unsigned = jwt({ alg: 'none', typ: 'JWT' }, { ...claims, iat: now(), exp: now() + 600 }, null)
    const err = await connectError(t, url, unsigned)
    t.equal(err.data?.code, 'AUTH_INVALID_TOKEN')
  })

  t.test('AUTH_INVALID_TOKEN for a token signed with the right key but another algorithm (HS512)', async t => {
    const other = jwt({ alg: 'HS512', typ: 'JWT' }, { ...claims, iat: now(), exp: now() + 600 })
    const err = await connectError(t, url, other)
    t.equal(err.data?.code, 'AUTH_INVALID_TOKEN')
  })

  t.test('AUTH_INVALID_TOKEN for garbage', async t => {
    for (const garbage of ['garbage', 'a.b.c', 'x'.repeat(5000)]) {
      const err = await connectError(t, url, garbage)
      t.equal(err.data?.code, 'AUTH_INVALID_TOKEN', `token ${garbage.slice(0, 10)}`)
    }
  })

  t.test('AUTH_INVALID_TOKEN for a token in the query string, even a valid one', async t => {
    const err = await connectError(t, url, undefined, { query: { token: admin.token } })
    t.equal(err.data?.code, 'AUTH_INVALID_TOKEN')
    t.match(err.data?.message, /query string/)
    const both = await connectError(t, url, admin.token, { query: { access_token: admin.token } })
    t.equal(both.data?.code, 'AUTH_INVALID_TOKEN', 'refused even alongside a valid auth.token')
  })

  t.test('AUTH_INVALID_TOKEN for validly signed claims of the wrong shape', async t => {
    const shapes: Array<Record<string, unknown>> = [
      { sub: admin.id, role: 'admin' },
      { sub: admin.id, companyId: acme.id, role: 'owner' },
      { sub: 42, companyId: acme.id, role: 'admin' },
      { companyId: acme.id, role: 'admin' }
    ]
    for (const shape of shapes) {
      const token = jwt({ alg: 'HS256', typ: 'JWT' }, { ...shape, iat: now(), exp: now() + 600 })
      const err = await connectError(t, url, token)
      t.equal(err.data?.code, 'AUTH_INVALID_TOKEN', JSON.stringify(shape))
    }
    const noExp = jwt({ alg: 'HS256', typ: 'JWT' }, { ...claims, iat: now() })
    t.equal((await connectError(t, url, noExp)).data?.code, 'AUTH_INVALID_TOKEN', 'a token without exp is refused')
  })

  t.test('AUTH_TOKEN_EXPIRED for an expired token signed with the app secret', async t => {
    const expired = jwt({ alg: 'HS256', typ: 'JWT' }, { ...claims, iat: now() - 120, exp: now() - 60 })
    const err = await connectError(t, url, expired)
    t.equal(err.data?.code, 'AUTH_TOKEN_EXPIRED')
    const viaJwt = app.jwt.sign({ ...claims, role: 'admin' as const, iat: now() - 120 }, { expiresIn: 1 })
    t.equal((await connectError(t, url, viaJwt)).data?.code, 'AUTH_TOKEN_EXPIRED', 'signed by @fastify/jwt with a past exp')
  })

  t.test('AUTH_NOT_A_MEMBER for a user removed from the company, and for an inactive user', async t => {
    const company = await createCompany(app, ['admin', 'member', 'manager'])
    const removed = company.as('member')
    await prisma.membership.delete({ where: { userId_companyId: { userId: removed.id, companyId: company.id } } })
    t.equal((await connectError(t, url, removed.token)).data?.code, 'AUTH_NOT_A_MEMBER', 'membership deleted: the token alone is not trusted')

    const inactive = company.as('manager')
    await prisma.user.update({ where: { id: inactive.id }, data: { active: false } })
    t.equal((await connectError(t, url, inactive.token)).data?.code, 'AUTH_NOT_A_MEMBER', 'inactive user')

    const otherCompany = await createCompany(app, ['admin'])
    const wrongCompany = app.erpAuth.sign({ sub: company.as('admin').id, companyId: otherCompany.id, role: 'admin' })
    t.equal((await connectError(t, url, wrongCompany)).data?.code, 'AUTH_NOT_A_MEMBER', 'valid user, token for a company they are not in')

    const ghost = app.erpAuth.sign({ sub: 'no-such-user', companyId: company.id, role: 'admin' })
    t.equal((await connectError(t, url, ghost)).data?.code, 'AUTH_NOT_A_MEMBER', 'unknown user')
  })

  t.test('AUTH_ORIGIN_REFUSED for a foreign browser Origin on the default same-origin config', async t => {
    const err = await connectError(t, url, admin.token, { extraHeaders: { origin: 'http://evil.example' } })
    t.equal(err.data?.code, 'AUTH_ORIGIN_REFUSED')
    t.match(err.data?.message, /evil\.example/)
    const bad = await connectError(t, url, admin.token, { extraHeaders: { origin: 'not a url' } })
    t.equal(bad.data?.code, 'AUTH_ORIGIN_REFUSED', 'an unparsable Origin is refused')
    const same = await connect(t, url, admin.token, { extraHeaders: { origin: url } })
    t.ok(same.connected, 'the same origin is allowed')
    const none = await connect(t, url, admin.token)
    t.ok(none.connected, 'clients without an Origin (mobile apps) are allowed')
  })

  t.test('a token in the Authorization header is accepted', async t => {
    const socket = await connect(t, url, undefined, { extraHeaders: { authorization: `Bearer ${admin.token}`, 'x-other': 'kept' } })
    t.ok(socket.connected)
    const handshake = app.io.of('/').sockets.get(socket.id!)!.handshake
    t.equal(handshake.headers.authorization, undefined, 'the credential is not kept on the socket')
    t.equal(handshake.headers['x-other'], 'kept', 'other headers are')
  })

  t.test('a valid token joins company:<id> and user:<id> and sets socket.data', async t => {
    const socket = await connect(t, url, admin.token)
    const server = app.io.of('/').sockets.get(socket.id!)
    t.ok(server)
    t.same(new Set(server!.rooms), new Set([socket.id, `company:${acme.id}`, `user:${admin.id}`]))
    t.match(server!.data, { userId: admin.id, companyId: acme.id, role: 'admin' })
    t.type(server!.data.exp, 'number')
    t.same(server!.handshake.auth, {}, 'the token is not kept on the socket')
  })
})

t.test('CORS_ORIGINS: a listed origin may open a socket, others are still refused', async t => {
  const { app, url } = await build(t, { config: { corsOrigins: ['http://app.example:8080'] } })
  const company = await createCompany(app, ['admin'])
  const token = company.as('admin').token
  const socket = await connect(t, url, token, { extraHeaders: { origin: 'http://app.example:8080' } })
  t.ok(socket.connected)
  const err = await connectError(t, url, token, { extraHeaders: { origin: 'http://evil.example' } })
  t.equal(err.data?.code, 'AUTH_ORIGIN_REFUSED')

  const preflight = await app.inject({
    method: 'OPTIONS',
    url: '/projects',
    headers: { origin: 'http://app.example:8080', 'access-control-request-method': 'POST' }
  })
  t.equal(preflight.headers['access-control-allow-origin'], 'http://app.example:8080', 'HTTP CORS lists the same origins')
  const foreign = await app.inject({ method: 'GET', url: '/health/live', headers: { origin: 'http://evil.example' } })
  t.notOk(foreign.headers['access-control-allow-origin'], 'no CORS header for an unlisted origin')
})

t.test('HTTP authentication errors use the { error: { code, message } } shape', async t => {
  const { app, prisma } = await build(t)
  const company = await createCompany(app)
  const admin = company.as('admin')
  const me = (headers: Record<string, string> = {}) => app.inject({ method: 'GET', url: '/auth/me', headers })

  const ok = await me(authHeader(admin))
  t.equal(ok.statusCode, 200)
  t.match(ok.json(), { userId: admin.id, companyId: company.id, role: 'admin' })

  const cases: Array<[string, Record<string, string>, number, string]> = [
    ['missing header', {}, 401, 'AUTH_MISSING_TOKEN'],
    ['not a bearer header', { authorization: `Basic ${Buffer.from('a:b').toString('base64')}` }, 401, 'AUTH_MISSING_TOKEN'],
    ['garbage token', { authorization: 'Bearer garbage' }, 401, 'AUTH_INVALID_TOKEN'],
    ['another key', { authorization: `Bearer ${jwt({ alg: 'HS256' }, { sub: admin.id, companyId: company.id, role: 'admin', iat: now(), exp: now() + 60 }, 'x'.repeat(40))}` }, 401, 'AUTH_INVALID_TOKEN'],
    ['alg none', { authorization: `Bearer ${jwt({ alg: 'none' }, { sub: admin.id, companyId: company.id, role: 'admin', iat: now(), exp: now() + 60 }, null)}` }, 401, 'AUTH_INVALID_TOKEN'],
    ['wrong claim shape', { authorization: `Bearer ${jwt({ alg: 'HS256' }, { sub: admin.id, role: 'admin', iat: now(), exp: now() + 60 })}` }, 401, 'AUTH_INVALID_TOKEN'],
    ['role outside the enum', { authorization: `Bearer ${jwt({ alg: 'HS256' }, { sub: admin.id, companyId: company.id, role: 'root', iat: now(), exp: now() + 60 })}` }, 401, 'AUTH_INVALID_TOKEN'],
    ['expired', { authorization: `Bearer ${jwt({ alg: 'HS256' }, { sub: admin.id, companyId: company.id, role: 'admin', iat: now() - 100, exp: now() - 10 })}` }, 401, 'AUTH_TOKEN_EXPIRED']
  ]
  for (const [name, headers, status, code] of cases) {
    const res = await me(headers)
    t.equal(res.statusCode, status, `${name}: status`)
    t.equal(res.headers['content-type']?.toString().split(';')[0], 'application/json', `${name}: JSON`)
    const body = res.json()
    t.equal(body.error?.code, code, `${name}: code`)
    t.type(body.error?.message, 'string', `${name}: message`)
  }

  // The same checks guard the domain routes, not just /auth/me.
  const projects = await app.inject({ method: 'GET', url: '/projects' })
  t.equal(projects.statusCode, 401)
  t.equal(projects.json().error.code, 'AUTH_MISSING_TOKEN')

  const member = company.as('member')
  await prisma.membership.delete({ where: { userId_companyId: { userId: member.id, companyId: company.id } } })
  const removed = await app.inject({ method: 'GET', url: '/projects', headers: authHeader(member) })
  t.equal(removed.statusCode, 403)
  t.same(Object.keys(removed.json().error).sort(), ['code', 'message'])
  t.equal(removed.json().error.code, 'AUTH_NOT_A_MEMBER')

  const manager = company.as('manager')
  await prisma.user.update({ where: { id: manager.id }, data: { active: false } })
  const inactive = await me(authHeader(manager))
  t.equal(inactive.statusCode, 403)
  t.equal(inactive.json().error.code, 'AUTH_NOT_A_MEMBER')
})

t.test('role comes from the membership row, not from the token', async t => {
  const { app, url } = await build(t)
  const company = await createCompany(app, ['member'])
  const member = company.as('member')
  const claimsAdmin = app.erpAuth.sign({ sub: member.id, companyId: company.id, role: 'admin' })
  const me = await app.inject({ method: 'GET', url: '/auth/me', headers: { authorization: `Bearer ${claimsAdmin}` } })
  t.equal(me.json().role, 'member')
  const socket = await connect(t, url, claimsAdmin)
  t.equal(app.io.of('/').sockets.get(socket.id!)?.data.role, 'member')
})

t.test('concurrent handshakes and membership lookups are batched, each with its own answer', async t => {
  const { app, url, prisma } = await build(t)
  const acme = await createCompany(app, ['admin', 'manager', 'member', 'member', 'member'])
  const globex = await createCompany(app, ['admin', 'member'])
  const [inactive, removed] = acme.users.slice(3)
  await prisma.user.update({ where: { id: inactive!.id }, data: { active: false } })
  await prisma.membership.delete({ where: { userId_companyId: { userId: removed!.id, companyId: acme.id } } })
  // A globex member with a token claiming acme: signed correctly, not a member there.
  const outsider = app.erpAuth.sign({ sub: globex.as('member').id, companyId: acme.id, role: 'member' })
  // Count the membership queries: erp-auth reads `prisma.$queryRaw` at each call.
  let queries = 0
  const queryRaw = prisma.$queryRaw.bind(prisma)
  const spy = (strings: TemplateStringsArray, ...values: unknown[]) => {
    if (strings.join('?').includes('memberships m')) queries++
    return queryRaw(strings, ...values)
  }
  Object.defineProperty(prisma, '$queryRaw', { value: spy, configurable: true, writable: true })
  t.teardown(() => { Object.defineProperty(prisma, '$queryRaw', { value: queryRaw, configurable: true, writable: true }) })
  const attempts: Array<{ token: string, expect: string, role?: string }> = [
    ...acme.users.slice(0, 3).map(u => ({ token: u.token, expect: 'ok', role: u.role })),
    { token: inactive!.token, expect: 'AUTH_NOT_A_MEMBER' },
    { token: removed!.token, expect: 'AUTH_NOT_A_MEMBER' },
    { token: outsider, expect: 'AUTH_NOT_A_MEMBER' },
    ...globex.users.map(u => ({ token: u.token, expect: 'ok', role: u.role }))
  ]
  // Five devices per attempt, all at once: a small reconnect storm.
  const storm = attempts.flatMap(a => [a, a, a, a, a])
  const outcomes = await Promise.all(storm.map(a => connect(t, url, a.token).then(
    socket => ({ result: 'ok', role: app.io.of('/').sockets.get(socket.id!)?.data.role }),
    (err: Error & { data?: { code: string } }) => ({ result: err.data?.code, role: undefined })
  )))
  t.same(outcomes.map(o => o.result), storm.map(a => a.expect), 'members in, others refused, each by its own row')
  t.same(outcomes.filter(o => o.result === 'ok').map(o => o.role), storm.filter(a => a.expect === 'ok').map(a => a.role), 'roles from the rows')
  t.ok(queries >= 1 && queries <= storm.length, `${queries} membership queries for ${storm.length} handshakes`)

  // Lookups started together are answered by one query (the handshake storm above batches as
  // far as its arrival spreads over turns allow).
  queries = 0
  const lookups = [
    [acme.as('admin').id, acme.id], [inactive!.id, acme.id], [removed!.id, acme.id],
    [globex.as('member').id, acme.id], [globex.as('member').id, globex.id], ['no-such-user', acme.id]
  ] as const
  const roles = await Promise.all(lookups.map(([userId, companyId]) => app.erpAuth.membership(userId, companyId)))
  t.same(roles, ['admin', null, null, null, 'member', null])
  t.equal(queries, 1, 'one query for six lookups')
})

t.test('the handshake check reads the stream heads before the join; erp-offline-queue reads them itself if they were taken', async t => {
  const db = await testDatabase(t)
  const app = Fastify()
  t.teardown(() => app.close())
  app.decorate('prisma', db.prisma)
  await app.register(erpSocket)
  await app.register(erpAuth, { secret: TEST_JWT_SECRET, prisma: db.prisma })
  // A middleware between erp-auth and erp-offline-queue that takes the heads first.
  const taken: Array<ReadonlyMap<string, number> | undefined> = []
  app.after(() => {
    app.io.use((socket, next) => {
      taken.push(app.erpAuth.takeHandshakeHeads(socket))
      taken.push(app.erpAuth.takeHandshakeHeads(socket))
      next()
    })
  })
  await app.register(erpOfflineQueue, { prisma: db.prisma, headIntervalMs: 0, pruneIntervalMs: 0 })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const url = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`
  // Another node on the same database publishes first: this node has never seen the stream.
  const other = await build(t, { db })
  const company = await createCompany(other.app, ['admin'])
  const admin = company.as('admin')
  const publish = (node: FastifyInstance, projectId: string) => node.eventLog.publish({ stream: companyStream(company.id), type: 'project:deleted', companyId: company.id, actorId: admin.id, data: { projectId } })
  for (const id of ['p1', 'p2', 'p3']) await publish(other.app, id)

  const socket = await connect(t, url, admin.token)
  t.same(taken[0], new Map([[companyStream(company.id), 3], [userStream(admin.id), 0]]), 'heads of both streams, read with the membership')
  t.equal(taken[1], undefined, 'taken once')
  const seen = record(socket)
  await publish(app, 'p4')
  await waitFor(() => seen.length === 1, 5000, 'the live event')
  await sleep(100)
  t.same(seen.map(e => e.payload.seq), [4], 'followed from head 3 read by erp-offline-queue itself: no history re-sent live')
})

t.test('POST /auth/login', async t => {
  const { app, prisma } = await build(t)
  const company = await createCompany(app, ['admin', 'member'])
  const admin = company.as('admin')
  const login = (body: unknown) => app.inject({ method: 'POST', url: '/auth/login', payload: body as object })

  const ok = await login({ email: admin.email.toUpperCase(), password: 'correct horse battery staple' })
  t.equal(ok.statusCode, 200)
  const body = ok.json()
  t.match(body, { user: { id: admin.id, email: admin.email }, company: { id: company.id }, role: 'admin' })
  t.match(app.erpAuth.verify(body.token), { sub: admin.id, companyId: company.id, role: 'admin' })
  t.equal(new Date(body.expiresAt).getTime() / 1000, app.erpAuth.verify(body.token).exp)

  const wrong = await login({ email: admin.email, password: 'nope' })
  t.equal(wrong.statusCode, 401)
  t.equal(wrong.json().error.code, 'AUTH_INVALID_CREDENTIALS')
  const unknown = await login({ email: 'nobody@example.test', password: 'nope' })
  t.equal(unknown.statusCode, 401)
  t.equal(unknown.json().error.code, 'AUTH_INVALID_CREDENTIALS', 'an unknown email looks like a wrong password')

  const other = await createCompany(app, ['admin'])
  const elsewhere = await login({ email: admin.email, password: 'correct horse battery staple', companyId: other.id })
  t.equal(elsewhere.statusCode, 403)
  t.equal(elsewhere.json().error.code, 'AUTH_NOT_A_MEMBER')

  // A user of two companies must say which one.
  await prisma.membership.create({ data: { userId: admin.id, companyId: other.id, role: 'member' } })
  const ambiguous = await login({ email: admin.email, password: 'correct horse battery staple' })
  t.equal(ambiguous.statusCode, 400)
  t.equal(ambiguous.json().error.code, 'VALIDATION_FAILED')
  t.equal(ambiguous.json().companies.length, 2)
  const chosen = await login({ email: admin.email, password: 'correct horse battery staple', companyId: other.id })
  t.equal(chosen.statusCode, 200)
  t.equal(chosen.json().role, 'member')

  await prisma.user.update({ where: { id: admin.id }, data: { active: false } })
  const inactive = await login({ email: admin.email, password: 'correct horse battery staple', companyId: company.id })
  t.equal(inactive.statusCode, 401)
  t.equal(inactive.json().error.code, 'AUTH_INVALID_CREDENTIALS')

  const invalid = await login({ email: 'not-an-email', password: '' })
  t.equal(invalid.statusCode, 400)
  t.equal(invalid.json().error.code, 'VALIDATION_FAILED')
})

// Regression (presence and auth review): the "not older" check ran before the membership query and
// not after it: of two refreshes sent together, the one with the earlier exp could be applied last,
// and the socket expired at that earlier time though the later token's refresh had been acked.
t.test('of two refreshes sent together, the earlier exp cannot replace the later one', async t => {
  const { app, url } = await build(t)
  const company = await createCompany(app, ['admin'])
  const admin = company.as('admin')
  const token = (exp: number) => jwt({ alg: 'HS256', typ: 'JWT' }, { sub: admin.id, companyId: company.id, role: 'admin', iat: now(), exp })
  const at = now()
  const socket = await connect(t, url, token(at + 60))
  const [later, earlier] = await Promise.all([
    request(socket, 'auth:refresh', { token: token(at + 3600) }),
    request(socket, 'auth:refresh', { token: token(at + 120) })
  ])
  t.same(later, { ok: true, exp: at + 3600 })
  t.match(earlier, { ok: false, error: { code: 'AUTH_INVALID_TOKEN', message: /expires before the current one/ } })
  t.equal(app.io.of('/').sockets.get(socket.id!)?.data.exp, at + 3600, 'the later exp stands')
})

t.test('expiry while connected', async t => {
  const { app, url } = await build(t)
  const company = await createCompany(app, ['admin', 'member'])
  const admin = company.as('admin')
  const member = company.as('member')
  // exp is in whole seconds: pick the next second boundary at least 2 s away.
  const exp = now() + 3
  const shortLived = (userId: string, role: 'admin' | 'member', expAt: number) =>
    jwt({ alg: 'HS256', typ: 'JWT' }, { sub: userId, companyId: company.id, role, iat: now(), exp: expAt })

  // Three sockets in parallel, so the test waits for one expiry only.
  const expiring = await connect(t, url, shortLived(admin.id, 'admin', exp))
  const refreshed = await connect(t, url, shortLived(admin.id, 'admin', exp))
  const badRefresh = await connect(t, url, shortLived(admin.id, 'admin', exp))

  const expiredEvent = nextEvent<{ message: string }>(expiring, 'auth:expired', 6000)
  const disconnected = new Promise<{ at: number, reason: string }>(resolve => {
    expiring.once('disconnect', reason => resolve({ at: Date.now(), reason }))
  })

  const newer = shortLived(admin.id, 'admin', exp + 60)
  const ack = await request(refreshed, 'auth:refresh', { token: newer })
  t.same(ack, { ok: true, exp: exp + 60 }, 'refresh acked with the new exp')

  const otherUser = await request(badRefresh, 'auth:refresh', { token: shortLived(member.id, 'member', exp + 60) })
  t.match(otherUser, { ok: false, error: { code: 'AUTH_INVALID_TOKEN' } }, "another user's token is refused")
  const garbage = await request(badRefresh, 'auth:refresh', { token: 'garbage' })
  t.match(garbage, { ok: false, error: { code: 'AUTH_INVALID_TOKEN' } }, 'garbage is refused')
  const older = await request(badRefresh, 'auth:refresh', { token: shortLived(admin.id, 'admin', exp - 1) })
  t.match(older, { ok: false, error: { code: 'AUTH_INVALID_TOKEN' } }, 'a token expiring earlier is refused')
  const expired = await request(badRefresh, 'auth:refresh', { token: shortLived(admin.id, 'admin', now() - 5) })
  t.match(expired, { ok: false, error: { code: 'AUTH_TOKEN_EXPIRED' } }, 'an expired token is refused')
  const otherCompany = await createCompany(app, ['admin'])
  await app.prisma.membership.create({ data: { userId: admin.id, companyId: otherCompany.id, role: 'admin' } })
  const crossCompany = await request(badRefresh, 'auth:refresh', {
    token: jwt({ alg: 'HS256' }, { sub: admin.id, companyId: otherCompany.id, role: 'admin', iat: now(), exp: exp + 60 })
  })
  t.match(crossCompany, { ok: false, error: { code: 'AUTH_INVALID_TOKEN' } }, "the same user's token for another company is refused")
  t.ok(badRefresh.connected, 'refused refreshes leave the socket connected')

  const info = await expiredEvent
  t.type(info.message, 'string')
  const { at, reason } = await disconnected
  t.equal(reason, 'io server disconnect')
  t.ok(at >= exp * 1000 - 50, `not disconnected before exp (${at - exp * 1000} ms)`)
  t.ok(at <= exp * 1000 + 1000, `disconnected within 1 s after exp (${at - exp * 1000} ms)`)
  t.equal(app.io.of('/').sockets.has(expiring.id ?? ''), false)

  await waitFor(() => !badRefresh.connected, 1500, 'the un-refreshed socket to be disconnected')
  await sleep(Math.max(0, exp * 1000 + 1200 - Date.now()))
  t.ok(refreshed.connected, 'the refreshed socket is still connected past the old exp')
  t.equal(app.io.of('/').sockets.get(refreshed.id!)?.data.exp, exp + 60)
})

// Regression (security review): nothing limited login attempts, so passwords could be guessed
// without end and a flood of logins kept the password hashing (libuv's thread pool) busy. Then
// (review of the limit): keyed by address and email, one address could try any number of
// accounts, and cheap requests with new emails pushed a guessed account's counter out of the
// limiter's store.
t.test('login attempts are limited per client address, whatever the email: past the limit 429 RATE_LIMITED, the password not checked', async t => {
  const { app } = await build(t, { config: { loginAttemptsPerMinute: 3 } })
  const company = await createCompany(app, ['admin', 'member'])
  const admin = company.as('admin')
  const login = (payload: object, remoteAddress = '10.0.0.1') =>
    app.inject({ method: 'POST', url: '/auth/login', remoteAddress, payload })

  t.equal((await login({ email: admin.email, password: 'guess' })).statusCode, 401)
  t.equal((await login({ email: 'someone-else@example.test', password: 'guess' })).statusCode, 401, 'another account')
  t.equal((await login({ email: 'not an email', password: '' })).statusCode, 400, 'an invalid body counts too')
  const limited = await login({ email: admin.email, password: 'correct horse battery staple' })
  t.equal(limited.statusCode, 429, 'the right password does not get through either')
  t.equal(limited.json().error.code, 'RATE_LIMITED')
  t.match(limited.json().error.message, /^Too many attempts; retry in \d+/)
  t.ok(Number(limited.headers['retry-after']) > 0, 'Retry-After')
  t.equal((await login({ email: company.as('member').email, password: 'correct horse battery staple' })).statusCode, 429, 'nor another account from that address')
  t.equal((await login({ email: admin.email, password: 'correct horse battery staple' }, '10.0.0.2')).statusCode, 200, 'another address is not limited')
})

// Regression (review of the limit): the password hashing queue had no bound, so logins from many
// addresses queued without end, and a legitimate one waited seconds.
t.test('a flood of logins past the hashing queue answers 503 at once instead of queueing without bound', async t => {
  const { app } = await build(t, { config: { loginAttemptsPerMinute: 0 } })
  const company = await createCompany(app, ['admin'])
  const answers = await Promise.all(Array.from({ length: 150 }, (_, i) => app.inject({
    method: 'POST', url: '/auth/login', remoteAddress: `10.1.${i >> 8}.${i & 255}`, payload: { email: company.as('admin').email, password: `guess ${i}` }
  })))
  const codes = answers.map(a => a.statusCode)
  t.ok(codes.every(code => code === 401 || code === 503), 'each is a 401 or a 503')
  // 64 hashes may be pending at once; the ones that finish early make room for a few more.
  const refused = codes.filter(code => code === 503).length
  t.ok(refused > 0 && refused < 150 - 64 + 30, `the ones past the bound answer 503 (${refused} of 150)`)
  t.match(answers.find(a => a.statusCode === 503)?.json().error, { code: 'SERVICE_UNAVAILABLE', message: 'Too many logins at once; retry' })
  t.equal((await app.inject({ method: 'POST', url: '/auth/login', payload: { email: company.as('admin').email, password: 'correct horse battery staple' } })).statusCode, 200, 'and logins work again once it has drained')
})

t.test('LOGIN_ATTEMPTS_PER_MINUTE=0 turns the login limit off', async t => {
  const { app } = await build(t, { config: { loginAttemptsPerMinute: 0 } })
  const company = await createCompany(app, ['admin'])
  for (let i = 0; i < 12; i++) {
    const res = await app.inject({ method: 'POST', url: '/auth/login', payload: { email: company.as('admin').email, password: 'guess' } })
    t.equal(res.statusCode, 401)
  }
})

t.test('behind a proxy (TRUST_PROXY), the login limit counts each client address from X-Forwarded-For', async t => {
  const { app } = await build(t, { config: { loginAttemptsPerMinute: 2, trustProxy: ['127.0.0.1'] } })
  const company = await createCompany(app, ['admin'])
  const login = (client: string) => app.inject({
    method: 'POST', url: '/auth/login', remoteAddress: '127.0.0.1', headers: { 'x-forwarded-for': client }, payload: { email: company.as('admin').email, password: 'guess' }
  })
  for (let i = 0; i < 2; i++) t.equal((await login('203.0.113.7')).statusCode, 401)
  t.equal((await login('203.0.113.7')).statusCode, 429, 'that client is limited')
  t.equal((await login('198.51.100.9')).statusCode, 401, 'another client behind the same proxy is not')
})
