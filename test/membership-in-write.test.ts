import t from 'tap'
import { randomUUID } from 'node:crypto'
import type { FastifyInstance } from 'fastify'
import { Prisma } from '../src/generated/prisma/client.ts'
import { authHeader, build, connect, createCompany, nextEvent, record, sleep } from './helpers.ts'
import { companyStream } from '../plugins/events.ts'

// Routes with `config: { erpAuth: { membership: 'in-write' } }` check the membership inside
// their write statement (`eventLog.commit({ guard })`) instead of a query before the handler.

const inWrite = { config: { erpAuth: { membership: 'in-write' as const } } }

const insertProject = (id: string, companyId: string, name: string) => Prisma.sql`
  INSERT INTO projects (id, "companyId", name, "updatedAt") VALUES (${id}, ${companyId}, ${name}, now())`

/** Test routes: an admin-only create, a delete whose write may touch nothing, and one that forgets the guard. */
async function testRoutes (app: FastifyInstance) {
  app.addHook('preHandler', app.authenticate)
  // A route's own onSend (one function, not a list) stays, and runs with erp-auth's.
  app.post('/test/admin-only', { ...inWrite, onSend: async (_request, reply, payload) => { reply.header('x-own-hook', 'ran'); return payload } }, async (request) => {
    const { companyId, userId } = request.user
    const id = randomUUID()
    const claimed = request.user.role
    await app.eventLog.commit({
      writes: [insertProject(id, companyId, 'admin only')],
      event: { stream: companyStream(companyId), type: 'project:deleted', companyId, actorId: userId, data: { projectId: id } },
      guard: app.erpAuth.writeGuard(request, ['admin'])
    })
    return { claimed, stored: request.user.role }
  })
  app.delete('/test/nothing', inWrite, async (request) => {
    const { companyId, userId } = request.user
    const envelope = await app.eventLog.commit({
      writes: [Prisma.sql`DELETE FROM projects WHERE id = ${randomUUID()} AND "companyId" = ${companyId}`],
      event: { stream: companyStream(companyId), type: 'project:deleted', companyId, actorId: userId, data: { projectId: 'none' } },
      guard: app.erpAuth.writeGuard(request)
    })
    return { envelope }
  })
  app.post('/test/forgot-guard', inWrite, async (request) => {
    if ((request.body as { fail?: boolean } | undefined)?.fail) throw new Error('handler failed')
    return { user: request.user.userId }
  })
  app.post('/test/duplicate', inWrite, async (request) => {
    const { companyId, userId } = request.user
    const id = randomUUID()
    await app.eventLog.commit({
      writes: [insertProject(id, companyId, 'first'), insertProject(id, companyId, 'same id')],
      event: { stream: companyStream(companyId), type: 'project:deleted', companyId, actorId: userId, data: { projectId: id } },
      guard: app.erpAuth.writeGuard(request)
    })
    return {}
  })
}

for (const embedded of [false, true]) {
  const on = embedded ? 'PGlite' : 'PostgreSQL'

  t.test(`${on}: POST /projects checks the membership in its write: members create, others change nothing`, async t => {
    const { app, url, prisma } = await build(t, { embedded })
    const company = await createCompany(app)
    const stream = companyStream(company.id)
    const watcher = await connect(t, url, company.as('admin').token)
    const seen = record(watcher)
    const create = (token: string, name: string) => app.inject({ method: 'POST', url: '/projects', headers: { authorization: `Bearer ${token}` }, payload: { name } })

    const created = nextEvent(watcher, 'project:created')
    const ok = await create(company.as('member').token, 'by a member')
    t.equal(ok.statusCode, 201)
    t.equal((await created).data.project.id, ok.json().project.id, 'the event went out')

    const removed = company.as('member')
    await prisma.membership.delete({ where: { userId_companyId: { userId: removed.id, companyId: company.id } } })
    const inactive = company.as('manager')
    await prisma.user.update({ where: { id: inactive.id }, data: { active: false } })
    const other = await createCompany(app, ['admin'])
    const cases: Array<[string, string]> = [
      ['membership deleted', removed.token],
      ['inactive user', inactive.token],
      ['token for a company the user is not in', app.erpAuth.sign({ sub: company.as('admin').id, companyId: other.id, role: 'admin' })],
      ['unknown user', app.erpAuth.sign({ sub: 'no-such-user', companyId: company.id, role: 'admin' })]
    ]
    for (const [name, token] of cases) {
      const res = await create(token, `refused: ${name}`)
      t.equal(res.statusCode, 403, `${name}: 403`)
      t.same(res.json(), { error: { code: 'AUTH_NOT_A_MEMBER', message: 'User is not an active member of this company' } }, `${name}: code`)
    }
    await sleep(50)
    t.equal(await prisma.project.count({ where: { name: { startsWith: 'refused' } } }), 0, 'no project written')
    t.equal(await prisma.revision.count({ where: { companyId: { in: [company.id, other.id] } } }), 1, 'only the member\'s revision')
    t.same((await app.eventLog.read(stream, 0, 10)).map(e => e.seq), [1], 'one event recorded')
    t.equal((await app.eventLog.heads([stream, companyStream(other.id)])).get(stream), 1, 'the head moved once')
    t.equal(seen.filter(s => s.event === 'project:created').length, 1, 'one event emitted')

    // Token errors are still answered before the handler, as on every route.
    const bad = await app.inject({ method: 'POST', url: '/projects', headers: { authorization: 'Bearer garbage' }, payload: { name: 'x' } })
    t.equal(bad.json().error.code, 'AUTH_INVALID_TOKEN')
    const missing = await app.inject({ method: 'POST', url: '/projects', payload: { name: 'x' } })
    t.equal(missing.json().error.code, 'AUTH_MISSING_TOKEN')
  })

  t.test(`${on}: DELETE /projects/:id checks the membership in its write: a removed member deletes nothing, a missing id is 404`, async t => {
    const { app, url, prisma } = await build(t, { embedded })
    const company = await createCompany(app, ['admin', 'member'])
    const stream = companyStream(company.id)
    const created = await app.inject({ method: 'POST', url: '/projects', headers: authHeader(company.as('admin')), payload: { name: 'to delete' } })
    const id = created.json().project.id
    const del = (user: { token: string }, projectId = id) => app.inject({ method: 'DELETE', url: `/projects/${projectId}`, headers: authHeader(user) })

    const member = company.as('member')
    await prisma.membership.delete({ where: { userId_companyId: { userId: member.id, companyId: company.id } } })
    const refused = await del(member)
    t.equal(refused.statusCode, 403)
    t.equal(refused.json().error.code, 'AUTH_NOT_A_MEMBER')
    t.equal(await prisma.project.count({ where: { id } }), 1, 'the project stays')
    t.equal((await app.eventLog.heads([stream])).get(stream), 1, 'only the create was recorded')
    t.equal((await del(member, 'no-such-project')).statusCode, 403, 'a missing id does not tell a non-member anything either')

    const watcher = await connect(t, url, company.as('admin').token)
    const deletedEvent = nextEvent(watcher, 'project:deleted')
    t.equal((await del(company.as('admin'))).statusCode, 204)
    t.same((await deletedEvent).data, { projectId: id, detachedExpenses: [], detachedExpenseCount: 0 })
    t.equal(await prisma.project.count({ where: { id } }), 0)
    const again = await del(company.as('admin'))
    t.equal(again.statusCode, 404)
    t.equal(again.json().error.code, 'NOT_FOUND')
    t.same((await app.eventLog.read(stream, 0, 10)).map(e => e.type), ['project:created', 'project:deleted'], 'a 404 records nothing')
  })

  t.test(`${on}: a guard with roles checks the stored role, not the claimed one, and leaves the stored role on request.user`, async t => {
    const { app, prisma } = await build(t, { embedded, routes: testRoutes })
    const company = await createCompany(app, ['admin', 'member'])
    const member = company.as('member')
    const claimsAdmin = app.erpAuth.sign({ sub: member.id, companyId: company.id, role: 'admin' })
    const refused = await app.inject({ method: 'POST', url: '/test/admin-only', headers: { authorization: `Bearer ${claimsAdmin}` } })
    t.equal(refused.statusCode, 403)
    t.same(refused.json().error, { code: 'FORBIDDEN', message: 'Role member may not do this' })
    t.equal(await prisma.project.count({ where: { companyId: company.id } }), 0, 'nothing written')

    const admin = company.as('admin')
    const claimsMember = app.erpAuth.sign({ sub: admin.id, companyId: company.id, role: 'member' })
    const ok = await app.inject({ method: 'POST', url: '/test/admin-only', headers: { authorization: `Bearer ${claimsMember}` } })
    t.equal(ok.statusCode, 200)
    t.same(ok.json(), { claimed: 'member', stored: 'admin' })
    t.equal(ok.headers['x-own-hook'], 'ran')
    t.equal(await prisma.project.count({ where: { companyId: company.id } }), 1)
  })

  t.test(`${on}: the guard runs even when the write touches no row`, async t => {
    const { app, prisma } = await build(t, { embedded, routes: testRoutes })
    const company = await createCompany(app, ['admin', 'member'])
    const ok = await app.inject({ method: 'DELETE', url: '/test/nothing', headers: authHeader(company.as('admin')) })
    t.same(ok.json(), { envelope: null }, 'a member: nothing to record, answered')
    const member = company.as('member')
    await prisma.membership.delete({ where: { userId_companyId: { userId: member.id, companyId: company.id } } })
    const refused = await app.inject({ method: 'DELETE', url: '/test/nothing', headers: authHeader(member) })
    t.equal(refused.statusCode, 403)
    t.equal(refused.json().error.code, 'AUTH_NOT_A_MEMBER')
  })
}

t.test('other errors of a guarded statement pass through unchanged, and nothing is written', async t => {
  const { app, prisma } = await build(t, { routes: testRoutes })
  const company = await createCompany(app, ['admin'])
  const res = await app.inject({ method: 'POST', url: '/test/duplicate', headers: authHeader(company.as('admin')) })
  t.equal(res.statusCode, 500)
  t.equal(res.json().error.code, 'INTERNAL')
  t.equal(await prisma.project.count({ where: { companyId: company.id } }), 0)
  t.equal((await app.eventLog.heads([companyStream(company.id)])).get(companyStream(company.id)), 0)
})

// Regression (review of this session's guard ordering): once the checks ran after the writes, a
// write that failed at once (a unique violation) answered a removed member with its own error
// instead of the guard's 403.
for (const embedded of [false, true]) {
  t.test(`a write failing before the guard's turn still answers a non-member 403 (${embedded ? 'PGlite' : 'PostgreSQL'})`, async t => {
    const { app, prisma } = await build(t, { embedded, routes: testRoutes })
    const company = await createCompany(app, ['admin', 'member'])
    const member = company.as('member')
    await prisma.membership.delete({ where: { userId_companyId: { userId: member.id, companyId: company.id } } })
    const res = await app.inject({ method: 'POST', url: '/test/duplicate', headers: authHeader(member) })
    t.equal(res.statusCode, 403)
    t.equal(res.json().error.code, 'AUTH_NOT_A_MEMBER')
    t.equal(await prisma.project.count({ where: { companyId: company.id } }), 0)
  })
}

t.test('an in-write route that answers without a passed guard gets a 500, not an unchecked success', async t => {
  const errors: string[] = []
  const { app } = await build(t, {
    embedded: true,
    routes: async (app) => {
      app.addHook('onError', async (_request, _reply, err) => { errors.push(err.code) })
      await testRoutes(app)
    }
  })
  const company = await createCompany(app, ['admin'])
  const res = await app.inject({ method: 'POST', url: '/test/forgot-guard', headers: authHeader(company.as('admin')) })
  t.equal(res.statusCode, 500)
  t.same(res.json(), { error: { code: 'INTERNAL', message: 'Internal server error' } }, 'a server bug: answered as one')
  t.same(errors, ['AUTH_MEMBERSHIP_UNCHECKED'], 'the logged error names it')
  t.notMatch(res.body, company.as('admin').id, 'the handler\'s answer did not go out')
  const failed = await app.inject({ method: 'POST', url: '/test/forgot-guard', headers: authHeader(company.as('admin')), payload: { fail: true } })
  t.equal(failed.statusCode, 500)
  t.equal(failed.json().error.code, 'INTERNAL', 'an error answer is left as it is')
})

t.test('config.erpAuth.membership is validated when the route is registered', async t => {
  const bad = async (app: FastifyInstance) => {
    app.get('/bad', { config: { erpAuth: { membership: 'later' as never } } }, async () => ({}))
  }
  await t.rejects(build(t, { embedded: true, routes: bad }), /GET \/bad: config.erpAuth.membership must be 'before' or 'in-write', got "later"/)
  const explicit = async (app: FastifyInstance) => {
    app.addHook('preHandler', app.authenticate)
    app.get('/explicit', { config: { erpAuth: { membership: 'before' } } }, async (request) => ({ role: request.user.role }))
  }
  const { app, prisma } = await build(t, { embedded: true, routes: explicit })
  const company = await createCompany(app, ['member'])
  t.same((await app.inject({ method: 'GET', url: '/explicit', headers: authHeader(company.as('member')) })).json(), { role: 'member' })
  await prisma.membership.deleteMany({ where: { companyId: company.id } })
  t.equal((await app.inject({ method: 'GET', url: '/explicit', headers: authHeader(company.as('member')) })).statusCode, 403, "'before' queries first")
})

t.test('writeGuard and checkMembership outside an in-write route', async t => {
  const { app } = await build(t, { embedded: true })
  t.throws(() => app.erpAuth.writeGuard({} as never), /writeGuard\(\) needs a request that went through fastify.authenticate/)
  // A request checked before the handler: nothing to do.
  await t.resolves(app.erpAuth.checkMembership({} as never))
})

t.test('regression: an idempotent replay on an in-write route checks the membership it skipped (it answers without the guarded write)', async t => {
  const { app, prisma } = await build(t, { embedded: true })
  const company = await createCompany(app, ['admin', 'member'])
  const member = company.as('member')
  const create = () => app.inject({ method: 'POST', url: '/projects', headers: { ...authHeader(member), 'idempotency-key': 'k-1' }, payload: { name: 'once' } })
  const first = await create()
  t.equal(first.statusCode, 201)
  const replayed = await create()
  t.equal(replayed.statusCode, 201)
  t.equal(replayed.headers['idempotent-replayed'], 'true')
  await prisma.membership.delete({ where: { userId_companyId: { userId: member.id, companyId: company.id } } })
  const refused = await create()
  t.equal(refused.statusCode, 403)
  t.equal(refused.json().error.code, 'AUTH_NOT_A_MEMBER')
  t.equal(await prisma.project.count({ where: { companyId: company.id } }), 1)
})

// Regression (database review): erp_require_member and erp_claim_commit found their tables
// through the caller's search_path, so a schema ahead of public (one named like the role, an
// ALTER DATABASE ... SET search_path) decided whose membership the guard read.
t.test('the guard functions read public\'s tables whatever the session\'s search_path', async t => {
  const { app, db } = await build(t)
  const company = await createCompany(app, ['member'])
  const member = company.as('member')
  const outsider = randomUUID()
  await db.withSession(sql => sql.exec(`CREATE SCHEMA shadow;
    CREATE TABLE shadow.users (id TEXT, active BOOLEAN);
    CREATE TABLE shadow.memberships ("userId" TEXT, "companyId" TEXT, role TEXT);
    INSERT INTO shadow.users VALUES ('${outsider}', true);
    INSERT INTO shadow.memberships VALUES ('${outsider}', '${company.id}', 'admin')`))
  const asSession = (userId: string) => db.withSession(async sql => {
    await sql.exec('SET search_path TO shadow, public')
    return await sql.query('SELECT "public".erp_require_member($1, $2, NULL::text[]) AS role', [userId, company.id])
  })
  await t.rejects(asSession(outsider), { code: 'ERPNM' }, 'a user only the shadow table lists is refused')
  t.same(await asSession(member.id), [{ role: 'member' }], 'the member public lists passes')
  const pinned = await app.prisma.$queryRaw<Array<{ name: string, config: string[] }>>`
    SELECT proname AS name, proconfig AS config FROM pg_proc WHERE proname IN ('erp_require_member', 'erp_claim_commit') ORDER BY proname`
  t.same(pinned, [{ name: 'erp_claim_commit', config: ['search_path=public, pg_temp'] }, { name: 'erp_require_member', config: ['search_path=public, pg_temp'] }])
})
