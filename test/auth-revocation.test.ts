import { createHmac } from 'node:crypto'
import pg from 'pg'
import t from 'tap'
import type { Socket as ClientSocket } from 'socket.io-client'
import Fastify from 'fastify'
import { erpAuth, erpSocket } from '../plugins/index.ts'
import {
  build, connect, connectError, createCompany, dropRedisPrefix, nextEvent, request, sleep, TEST_JWT_SECRET, TEST_POSTGRES_URL,
  TEST_REDIS_URL, testDatabase, uniqueName, waitFor
} from './helpers.ts'
import { FAST, list, watch } from './presence-scenarios.ts'

const now = () => Math.floor(Date.now() / 1000)

/** A token with a chosen `exp` (the app only issues tokenTtlSeconds ones). */
function tokenFor (user: { id: string }, companyId: string, exp: number): string {
  const part = (value: unknown) => Buffer.from(JSON.stringify(value)).toString('base64url')
  const head = `${part({ alg: 'HS256', typ: 'JWT' })}.${part({ sub: user.id, companyId, role: 'member', iat: now(), exp })}`
  return `${head}.${createHmac('sha256', TEST_JWT_SECRET).update(head).digest('base64url')}`
}

/** Resolves with the revocation notice and the disconnect reason that follows it. */
function revoked (socket: ClientSocket, timeoutMs = 5000) {
  const notice = nextEvent<{ code: string, message: string }>(socket, 'auth:revoked', timeoutMs)
  const reason = new Promise<string>(resolve => socket.once('disconnect', resolve))
  return Promise.all([notice, reason])
}

t.test('a member removed from the company is cut at the next membership re-check; the others stay', async t => {
  const { app, url } = await build(t, { realtime: { auth: { membershipRecheckMs: 200 } } })
  const company = await createCompany(app, ['admin', 'member', 'member'])
  const [, leaving, staying] = company.users
  const leavingSocket = await connect(t, url, leaving!.token)
  const stayingSocket = await connect(t, url, staying!.token)
  const cut = revoked(leavingSocket)

  await app.prisma.membership.delete({ where: { userId_companyId: { userId: leaving!.id, companyId: company.id } } })
  const [notice, reason] = await cut
  t.same(notice.code, 'AUTH_NOT_A_MEMBER')
  t.type(notice.message, 'string')
  t.equal(reason, 'io server disconnect', 'a server disconnect: the client does not reconnect on its own')
  await sleep(500)
  t.ok(stayingSocket.connected, 'the member who stays is not touched by the re-checks')
  const again = await connectError(t, url, leaving!.token)
  t.equal(again.data?.code, 'AUTH_NOT_A_MEMBER', 'the old token no longer opens a socket')
})

t.test('a deactivated user is cut at the next membership re-check', async t => {
  const { app, url } = await build(t, { realtime: { auth: { membershipRecheckMs: 200 } } })
  const company = await createCompany(app, ['admin', 'member'])
  const member = company.as('member')
  const socket = await connect(t, url, member.token)
  const cut = revoked(socket)
  await app.prisma.user.update({ where: { id: member.id }, data: { active: false } })
  const [notice] = await cut
  t.equal(notice.code, 'AUTH_NOT_A_MEMBER')
})

t.test('erpAuth.recheck(userId) cuts at once only the sockets of companies the user left, and takes over a changed role', async t => {
  const { app, url } = await build(t, { realtime: { auth: { membershipRecheckMs: 0 } } })
  const acme = await createCompany(app, ['admin', 'member'])
  const globex = await createCompany(app, ['admin'])
  const member = acme.as('member')
  await app.prisma.membership.create({ data: { userId: member.id, companyId: globex.id, role: 'member' } })
  const inAcme = await connect(t, url, member.token)
  const inGlobex = await connect(t, url, app.erpAuth.sign({ sub: member.id, companyId: globex.id, role: 'member' }))
  const bystander = await connect(t, url, acme.as('admin').token)
  const cut = revoked(inGlobex)

  await app.prisma.membership.delete({ where: { userId_companyId: { userId: member.id, companyId: globex.id } } })
  await app.prisma.membership.update({ where: { userId_companyId: { userId: member.id, companyId: acme.id } }, data: { role: 'manager' } })
  t.equal(await app.erpAuth.recheck(member.id), 1, 'one socket cut on this node')
  const [notice] = await cut
  t.equal(notice.code, 'AUTH_NOT_A_MEMBER')
  await sleep(100)
  t.ok(inAcme.connected, 'the socket of the company the user still belongs to stays')
  t.ok(bystander.connected)
  t.equal(app.io.of('/').sockets.get(inAcme.id!)?.data.role, 'manager', 'the stored role replaces the one checked at the handshake')
  t.equal(await app.erpAuth.recheck(), 0, 'a re-check of every socket finds nothing more to cut')
})

// Regression (review of confirmSocket): a socket whose handshake check was under 5 s old was
// trusted by confirmSocket even while a re-check asked for after the membership's removal was
// still querying, so a sync:resume in that window replayed the company's history.
t.test('confirmSocket trusts no earlier check once a re-check was asked for, and a fresh check otherwise', async t => {
  const { app, url } = await build(t, { realtime: { auth: { membershipRecheckMs: 0 } } })
  const company = await createCompany(app, ['member'])
  const member = company.as('member')
  const client = await connect(t, url, member.token)
  const socket = app.io.of('/').sockets.get(client.id!)!
  t.equal(await app.erpAuth.confirmSocket(socket), true, 'a member whose handshake just passed')

  await app.prisma.membership.deleteMany({ where: { userId: member.id } })
  t.equal(await app.erpAuth.confirmSocket(socket), true, 'within 5 s of a passed check and no re-check asked: no query (so not yet noticed)')
  const cut = revoked(client)
  const recheck = app.erpAuth.recheck(member.id)
  t.equal(await app.erpAuth.confirmSocket(socket), false, 'with a re-check under way it asks the database itself')
  await recheck
  const [notice] = await cut
  t.equal(notice.code, 'AUTH_NOT_A_MEMBER', 'cut once, by whichever check answered first')
  t.equal(socket.connected, false)
})

t.test('erpAuth.recheck on one node cuts the user’s sockets on the other nodes too', async t => {
  const prefix = uniqueName('revoke')
  t.teardown(() => dropRedisPrefix(TEST_REDIS_URL, prefix))
  const db = await testDatabase(t)
  const realtime = { socket: { redis: TEST_REDIS_URL, redisPrefix: prefix }, auth: { membershipRecheckMs: 0 } }
  const a = await build(t, { db, realtime })
  const b = await build(t, { db, realtime })
  const company = await createCompany(a.app, ['admin', 'member'])
  const member = company.as('member')
  const onB = await connect(t, b.url, member.token)
  const cut = revoked(onB)
  await a.app.prisma.membership.delete({ where: { userId_companyId: { userId: member.id, companyId: company.id } } })
  t.equal(await a.app.erpAuth.recheck(member.id), 0, 'nothing to cut on the node asked')
  const [notice] = await cut
  t.equal(notice.code, 'AUTH_NOT_A_MEMBER', 'node b re-checked and cut its socket')
})

t.test('regression: erpAuth.recheck missed a socket whose handshake was past its membership query but not yet connected', async t => {
  const { app, url } = await build(t, { realtime: { auth: { membershipRecheckMs: 0 } } })
  const company = await createCompany(app, ['admin', 'member'])
  const member = company.as('member')
  let passedAuth!: () => void
  const authPassed = new Promise<void>(resolve => { passedAuth = resolve })
  let proceed!: () => void
  const mayProceed = new Promise<void>(resolve => { proceed = resolve })
  // After erp-auth's middleware: the membership was checked, the connection event not reached.
  app.io.use((_socket, next) => {
    passedAuth()
    mayProceed.then(() => next(), next)
  })
  const connecting = connect(t, url, member.token)
  await authPassed
  await app.prisma.membership.delete({ where: { userId_companyId: { userId: member.id, companyId: company.id } } })
  t.equal(await app.erpAuth.recheck(member.id), 0, 'nothing connected to cut yet')
  proceed()
  const socket = await connecting
  const [notice] = await revoked(socket)
  t.equal(notice.code, 'AUTH_NOT_A_MEMBER', 'checked again once connected, and cut')
})

t.test('a re-check that cannot reach the database cuts nothing', async t => {
  const db = await testDatabase(t)
  const { app, url } = await build(t, { db, realtime: { auth: { membershipRecheckMs: 0 } } })
  const company = await createCompany(app, ['admin', 'member'])
  const socket = await connect(t, url, company.as('member').token)
  // Terminating the pool's connections and taking away its permission to log in stands in for
  // a database outage without disturbing the other tests' databases.
  const name = new URL(db.url!).pathname.slice(1)
  const admin = new pg.Client({ connectionString: TEST_POSTGRES_URL })
  await admin.connect()
  t.teardown(() => admin.end())
  await admin.query(`ALTER DATABASE ${name} ALLOW_CONNECTIONS false`)
  await admin.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()', [name])
  await t.rejects(app.erpAuth.recheck(), 'the failure reaches the caller')
  t.ok(socket.connected, 'the socket stays: an outage is not a revocation')
  await admin.query(`ALTER DATABASE ${name} ALLOW_CONNECTIONS true`)
})

t.test('auth:refresh that finds the membership gone is refused, then the socket is cut', async t => {
  const { app, url } = await build(t, { realtime: { auth: { membershipRecheckMs: 0 } } })
  const company = await createCompany(app, ['admin', 'member', 'member'])
  const [, member, other] = company.users
  const socket = await connect(t, url, member!.token)

  await app.prisma.membership.delete({ where: { userId_companyId: { userId: other!.id, companyId: company.id } } })
  const foreign = await request(socket, 'auth:refresh', { token: tokenFor(other!, company.id, now() + 7200) })
  t.match(foreign, { ok: false, error: { code: 'AUTH_INVALID_TOKEN' } }, 'another user’s token (of a non-member) says nothing about this socket')
  await sleep(50)
  t.ok(socket.connected)

  const cut = revoked(socket)
  await app.prisma.membership.delete({ where: { userId_companyId: { userId: member!.id, companyId: company.id } } })
  const answer = await request(socket, 'auth:refresh', { token: tokenFor(member!, company.id, now() + 7200) })
  t.match(answer, { ok: false, error: { code: 'AUTH_NOT_A_MEMBER' } }, 'the refusal is acked first')
  const [notice, reason] = await cut
  t.equal(notice.code, 'AUTH_NOT_A_MEMBER')
  t.equal(reason, 'io server disconnect')
})

t.test('a token that expires while the handshake’s membership query waits is refused with AUTH_TOKEN_EXPIRED', async t => {
  const db = await testDatabase(t)
  const { app, url } = await build(t, { db })
  const company = await createCompany(app, ['admin', 'member'])
  const member = company.as('member')
  const exp = now() + 2
  // Holds the membership query until the token has expired.
  const locker = new pg.Client({ connectionString: db.url })
  await locker.connect()
  t.teardown(() => locker.end())
  await locker.query('BEGIN')
  await locker.query('LOCK TABLE memberships IN ACCESS EXCLUSIVE MODE')
  const refused = connectError(t, url, tokenFor(member, company.id, exp))
  await sleep(exp * 1000 - Date.now() + 100)
  await locker.query('COMMIT')
  const err = await refused
  t.equal(err.data?.code, 'AUTH_TOKEN_EXPIRED')
})

t.test('regression: a token that expired just before the connection event left a permanent "online" in presence', async t => {
  const { app, url } = await build(t, { realtime: { presence: FAST } })
  const company = await createCompany(app, ['admin', 'member'])
  const member = company.as('member')
  const observer = await watch(t, url, company.as('admin').token)
  // A middleware after erp-auth's that lets the token run out: the socket reaches the
  // connection event (where every plugin's listener runs) with an expired token.
  app.io.use((socket, next) => {
    const wait = socket.data.exp * 1000 - Date.now() + 20
    setTimeout(next, Math.max(0, wait))
  })
  // exp is in whole seconds: now() + 1 can be a few ms away, and a token that runs out before
  // erp-auth's own check is refused at the handshake (the user never comes online, so no offline
  // ever comes). now() + 2 leaves at least 1 s for the handshake; the middleware waits out the rest.
  const socket = await connect(t, url, tokenFor(member, company.id, now() + 2)).catch(() => undefined)
  if (socket) await nextEvent(socket, 'auth:expired').catch(() => {})
  await waitFor(() => observer.about(member.id).some(change => change.status === 'offline'), FAST.graceMs + 3000,
    'the expired user to go offline')
  await sleep(FAST.ttlMs + 100)
  t.same((await list(observer.socket)).map(u => u.userId), [company.as('admin').id], 'nobody is left listed online')
})

t.test('membershipRecheckMs is validated', async t => {
  for (const membershipRecheckMs of [-1, 50, 1.5, 25 * 3600 * 1000]) {
    const app = Fastify()
    t.teardown(() => app.close())
    app.register(erpSocket)
    app.register(erpAuth, { secret: TEST_JWT_SECRET, prisma: { membership: {} } as never, membershipRecheckMs })
    await t.rejects(async () => { await app.ready() }, /erp-auth: invalid option membershipRecheckMs/, String(membershipRecheckMs))
  }
})
