import t, { type Test } from 'tap'
import type { InjectOptions } from 'fastify'
import type { Socket as ClientSocket } from 'socket.io-client'
import { authHeader, build, connect, createCompany, record, request, sleep } from './helpers.ts'

/** Asserts the contract's error shape and returns the code. */
function errorCode (t: Test, res: { statusCode: number, headers: Record<string, unknown>, json (): any }, status: number | number[], what: string): string {
  const statuses = Array.isArray(status) ? status : [status]
  t.ok(statuses.includes(res.statusCode), `${what}: status ${res.statusCode} is ${statuses.join(' or ')}`)
  t.match(String(res.headers['content-type']), /^application\/json/, `${what}: JSON answer`)
  const body = res.json()
  t.type(body.error?.code, 'string', `${what}: error.code`)
  t.type(body.error?.message, 'string', `${what}: error.message`)
  return body.error?.code
}

t.test('bad input over HTTP answers 400 (or 413/414/415) with the error shape and changes nothing', async t => {
  const { app, prisma } = await build(t)
  const company = await createCompany(app)
  const admin = company.as('admin')
  const send = (method: InjectOptions['method'], url: string, payload?: unknown, headers: Record<string, string> = {}) =>
    app.inject({ method, url, headers: { ...authHeader(admin), ...headers }, ...(payload === undefined ? {} : { payload: payload as string }) })

  const project = (await send('POST', '/projects', { name: 'Base' })).json().project
  const item = (await send('POST', '/stock/items', { sku: 'A-1', name: 'Anchor', quantity: 5 })).json().item
  const expense = (await send('POST', '/expenses', { amountMinor: 100, currency: 'EUR', description: 'Fuel' })).json().expense
  const eventsBefore = await prisma.event.count()
  const huge = 'x'.repeat(100_000)

  const validation: Array<[string, InjectOptions['method'], string, unknown]> = [
    ['project: missing name', 'POST', '/projects', {}],
    ['project: name of the wrong type', 'POST', '/projects', { name: 42 }],
    ['project: blank name', 'POST', '/projects', { name: '   ' }],
    ['project: unknown field', 'POST', '/projects', { name: 'ok', companyId: 'another' }],
    ['project: huge name', 'POST', '/projects', { name: huge }],
    ['project: huge description', 'POST', '/projects', { name: 'ok', description: 'd'.repeat(5001) }],
    ['project: unknown status', 'POST', '/projects', { name: 'ok', status: 'deleted' }],
    ['project: fractional budget', 'POST', '/projects', { name: 'ok', budgetMinor: 1.5 }],
    ['project: budget as a string', 'POST', '/projects', { name: 'ok', budgetMinor: '100' }],
    ['project: negative budget', 'POST', '/projects', { name: 'ok', budgetMinor: -1 }],
    ['project: body is an array', 'POST', '/projects', [{ name: 'ok' }]],
    ['project: body is null', 'POST', '/projects', 'null'],
    ['project update: version as a string', 'PATCH', `/projects/${project.id}`, { baseVersion: '1', name: 'x' }],
    ['project update: version 0', 'PATCH', `/projects/${project.id}`, { baseVersion: 0, name: 'x' }],
    ['project update: version newer than the row', 'PATCH', `/projects/${project.id}`, { baseVersion: 99, name: 'x' }],
    ['project update: no version at all', 'PATCH', `/projects/${project.id}`, { name: 'x' }],
    ['project update: version changed by the client', 'PATCH', `/projects/${project.id}`, { baseVersion: 1, version: 7 }],
    // Regression: a PATCH naming no field bumped the version and published an empty project:updated.
    ['project update: no field to change', 'PATCH', `/projects/${project.id}`, { baseVersion: 1 }],
    ['expense: amount as a string', 'POST', '/expenses', { amountMinor: '12.50', currency: 'EUR', description: 'x' }],
    ['expense: zero amount', 'POST', '/expenses', { amountMinor: 0, currency: 'EUR', description: 'x' }],
    ['expense: amount above the limit', 'POST', '/expenses', { amountMinor: 3_000_000_000, currency: 'EUR', description: 'x' }],
    ['expense: lowercase currency', 'POST', '/expenses', { amountMinor: 1, currency: 'eur', description: 'x' }],
    ['expense: missing description', 'POST', '/expenses', { amountMinor: 1, currency: 'EUR' }],
    ['expense: status set by the client', 'POST', '/expenses', { amountMinor: 1, currency: 'EUR', description: 'x', status: 'approved' }],
    ['expense reject: unknown field', 'POST', `/expenses/${expense.id}/reject`, { reason: 'no', approverId: admin.id }],
    ['expense reject: huge reason', 'POST', `/expenses/${expense.id}/reject`, { reason: huge }],
    ['stock: sku with spaces', 'POST', '/stock/items', { sku: 'A 2', name: 'x' }],
    ['stock: negative reorder level', 'POST', '/stock/items', { sku: 'A-2', name: 'x', reorderLevel: -1 }],
    ['stock: allowNegative as a string', 'POST', '/stock/items', { sku: 'A-2', name: 'x', allowNegative: 'yes' }],
    ['adjustment: zero delta', 'POST', `/stock/items/${item.id}/adjustments`, { delta: 0, reason: 'x' }],
    ['adjustment: fractional delta', 'POST', `/stock/items/${item.id}/adjustments`, { delta: 0.5, reason: 'x' }],
    ['adjustment: missing reason', 'POST', `/stock/items/${item.id}/adjustments`, { delta: 1 }],
    ['adjustment: delta as a string', 'POST', `/stock/items/${item.id}/adjustments`, { delta: '1', reason: 'x' }],
    ['count: missing quantity', 'PUT', `/stock/items/${item.id}/count`, { baseVersion: 1 }],
    ['count: quantity beyond the range', 'PUT', `/stock/items/${item.id}/count`, { quantity: 1e12, baseVersion: 1 }],
    // Regression (HTTP review): PostgreSQL text and jsonb cannot hold NUL, and jsonb refuses a lone
    // surrogate: these answered 500 INTERNAL (or stored U+FFFD) instead of 400.
    ['project: NUL in the name', 'POST', '/projects', { name: 'a\u0000b' }],
    ['project: lone surrogate in the name', 'POST', '/projects', { name: 'a\ud800b' }],
    ['project: NUL in the description', 'POST', '/projects', { name: 'ok', description: 'x\u0000' }],
    ['project update: NUL in the name', 'PATCH', `/projects/${project.id}`, { baseVersion: 1, name: '\u0000' }],
    ['project update: lone surrogate in the description', 'PATCH', `/projects/${project.id}`, { baseVersion: 1, description: '\udfff' }],
    ['expense: NUL in the description', 'POST', '/expenses', { amountMinor: 1, currency: 'EUR', description: 'x\u0000' }],
    ['expense: NUL in the project id', 'POST', '/expenses', { amountMinor: 1, currency: 'EUR', description: 'x', projectId: 'p\u0000' }],
    ['expense reject: NUL in the reason', 'POST', `/expenses/${expense.id}/reject`, { reason: 'no\u0000' }],
    ['stock: NUL in the name', 'POST', '/stock/items', { sku: 'A-3', name: 'x\u0000' }],
    ['adjustment: NUL in the reason', 'POST', `/stock/items/${item.id}/adjustments`, { delta: 1, reason: '\u0000' }],
    ['count: lone surrogate in the reason', 'PUT', `/stock/items/${item.id}/count`, { quantity: 1, baseVersion: 1, reason: '\ud800' }],
    ['project id with NUL', 'GET', '/projects/a%00b', undefined],
    ['expense id with NUL', 'POST', '/expenses/a%00b/approve', {}],
    ['login: NUL in the company id', 'POST', '/auth/login', { email: 'a@b.test', password: 'x', companyId: 'c\u0000' }],
    ['login: not an email', 'POST', '/auth/login', { email: 'nope', password: 'x' }],
    ['login: unknown field', 'POST', '/auth/login', { email: 'a@b.test', password: 'x', role: 'admin' }]
  ]
  for (const [what, method, url, payload] of validation) {
    const res = await send(method, url, payload, typeof payload === 'string' ? { 'content-type': 'application/json' } : {})
    t.equal(errorCode(t, res, 400, what), 'VALIDATION_FAILED', `${what}: VALIDATION_FAILED`)
    t.ok(res.body.length < 5000, `${what}: the answer does not echo huge input`)
  }
  const withIssues = await send('POST', '/projects', { name: 7, extra: true })
  t.match(withIssues.json().error.issues, [{ path: 'name', message: String }, { path: '', message: /extra/ }], 'issues name each field')

  const queries: Array<[string, string]> = [
    ['limit not a number', '/projects?limit=abc'],
    ['limit 0', '/projects?limit=0'],
    ['limit too large', '/stock/items?limit=100000'],
    ['negative offset', '/expenses?offset=-1'],
    ['unknown expense status', '/expenses?status=paid']
  ]
  for (const [what, url] of queries) {
    t.equal(errorCode(t, await send('GET', url), 400, what), 'VALIDATION_FAILED', `${what}: VALIDATION_FAILED`)
  }

  // Half-quoted tags were taken as the version (stock review).
  const ifMatch: Array<[string, string]> = [['letters', 'abc'], ['a list', '"1", "2"'], ['a wildcard', '*'], ['negative', '-1'], ['an unclosed quote', '"1'], ['an unopened quote', '1"'], ['a weak tag unquoted', 'W/1']]
  for (const [what, header] of ifMatch) {
    const res = await send('PATCH', `/projects/${project.id}`, { name: 'x' }, { 'if-match': header })
    t.equal(errorCode(t, res, 400, `If-Match ${what}`), 'VALIDATION_FAILED')
  }
  const countBadIfMatch = await send('PUT', `/stock/items/${item.id}/count`, { quantity: 1 }, { 'if-match': 'v1' })
  t.equal(errorCode(t, countBadIfMatch, 400, 'count with a bad If-Match'), 'VALIDATION_FAILED')

  // Decided by Fastify before our handlers: JSON syntax, size, media type, router limits.
  const malformed = await send('POST', '/projects', '{"name": "unterminated', { 'content-type': 'application/json' })
  t.equal(errorCode(t, malformed, 400, 'malformed JSON'), 'FST_ERR_CTP_INVALID_JSON_BODY')
  const empty = await send('POST', '/projects', '', { 'content-type': 'application/json' })
  t.equal(errorCode(t, empty, 400, 'empty JSON body'), 'FST_ERR_CTP_EMPTY_JSON_BODY')
  const proto = await send('POST', '/projects', '{"name":"p","__proto__":{"admin":true}}', { 'content-type': 'application/json' })
  t.equal(errorCode(t, proto, 400, '__proto__ in JSON'), 'FST_ERR_CTP_INVALID_JSON_BODY')
  const oversized = await send('POST', '/projects', JSON.stringify({ name: 'x'.repeat(300 * 1024) }), { 'content-type': 'application/json' })
  t.equal(errorCode(t, oversized, 413, 'body over bodyLimit'), 'FST_ERR_CTP_BODY_TOO_LARGE')
  const xml = await send('POST', '/projects', '<project/>', { 'content-type': 'application/xml' })
  t.equal(errorCode(t, xml, 415, 'unsupported media type'), 'FST_ERR_CTP_INVALID_MEDIA_TYPE')
  const text = await send('POST', '/projects', 'name=x', { 'content-type': 'text/plain' })
  t.equal(errorCode(t, text, 400, 'text body'), 'VALIDATION_FAILED')

  // Regression: router errors used Fastify's own body ({ error: 'Bad Request', code }), not the contract's shape.
  const longId = await send('GET', `/projects/${'x'.repeat(300)}`)
  t.equal(errorCode(t, longId, 414, 'an over-long :id'), 'FST_ERR_MAX_PARAM_LENGTH')
  // Regression: ids of 101-128 characters hit the router's default 100-character limit (414).
  const longValidId = await send('GET', `/projects/${'x'.repeat(120)}`)
  t.equal(errorCode(t, longValidId, 404, 'a 120-character id that does not exist'), 'NOT_FOUND')
  const tooLongId = await send('GET', `/projects/${'x'.repeat(200)}`)
  t.equal(errorCode(t, tooLongId, 400, 'a 200-character id'), 'VALIDATION_FAILED')
  const badUrl = await send('GET', '/projects/%E0%A4%A')
  t.equal(errorCode(t, badUrl, 400, 'a badly encoded URL'), 'FST_ERR_BAD_URL')

  const unknownRoute = await send('GET', '/nope')
  t.equal(errorCode(t, unknownRoute, 404, 'unknown route'), 'NOT_FOUND')
  const unknownId = await send('GET', '/projects/00000000-0000-0000-0000-000000000000')
  t.equal(errorCode(t, unknownId, 404, 'unknown id'), 'NOT_FOUND')

  // Nothing above changed anything.
  t.equal(await prisma.project.count(), 1)
  t.match(await prisma.project.findUniqueOrThrow({ where: { id: project.id } }), { name: 'Base', version: 1 })
  t.equal(await prisma.expense.count(), 1)
  t.match(await prisma.expense.findUniqueOrThrow({ where: { id: expense.id } }), { status: 'submitted', version: 1 })
  t.equal(await prisma.stockItem.count(), 1)
  t.match(await prisma.stockItem.findUniqueOrThrow({ where: { id: item.id } }), { quantity: 5, version: 1 })
  t.equal(await prisma.event.count(), eventsBefore, 'no event recorded')

  // Valid forms of If-Match still work.
  const weak = await send('PATCH', `/projects/${project.id}`, { name: 'Weak' }, { 'if-match': 'W/"1"' })
  t.equal(weak.statusCode, 200, 'W/"1" is accepted')
  const strong = await send('PATCH', `/projects/${project.id}`, { name: 'Strong' }, { 'if-match': '"2"' })
  t.equal(strong.statusCode, 200, '"2" is accepted')
  t.equal(strong.json().project.version, 3)
})

// Regression (HTTP review): a host app's route that lets a NUL through to PostgreSQL answered 500
// INTERNAL; the error handler answers it as the input's fault, 400. Other data exceptions are not
// the input's fault for certain (review of that fix): they stay 500, and an Idempotency-Key
// retry of them runs again.
t.test('text the database cannot store answers 400 even from a route that does not check it; other data exceptions stay 500', async t => {
  let runs = 0
  const { app, prisma } = await build(t, {
    routes: async (fastify) => {
      fastify.post('/unchecked/:how', { preHandler: fastify.authenticate }, async (request) => {
        const { how } = request.params as { how: string }
        const { name } = request.body as { name: string }
        const { companyId, userId } = request.user
        if (how === 'text') return prisma.project.create({ data: { companyId, name } })
        if (how === 'raw') return prisma.$executeRaw`INSERT INTO projects (id, "companyId", name) VALUES (gen_random_uuid()::text, ${companyId}, ${name})`
        if (how === 'jsonb') return prisma.$executeRaw`SELECT ${JSON.stringify({ name })}::jsonb`
        if (how === 'division') {
          runs++
          return String(await prisma.$queryRaw`SELECT 1 / ${0} AS x`)
        }
        return fastify.eventLog.publish({ stream: `company:${companyId}`, type: 'project:created', companyId, actorId: userId, data: { name } as never })
      })
    }
  })
  const admin = (await createCompany(app)).as('admin')
  const cases: Array<[string, string, RegExp]> = [
    ['text', 'a\u0000b', /cannot store \(NUL/],
    ['raw', 'a\u0000b', /cannot store \(NUL/],
    ['jsonb', 'a\u0000b', /cannot store \(NUL/],
    // An event's text is checked by the event log before anything is written.
    ['event', 'a\u0000b', /an event cannot hold NUL/],
    ['event', 'a\ud800b', /an event cannot hold NUL/]
  ]
  for (const [how, name, message] of cases) {
    const res = await app.inject({ method: 'POST', url: `/unchecked/${how}`, headers: authHeader(admin), payload: { name } })
    t.equal(errorCode(t, res, 400, `${how} ${JSON.stringify(name)}`), 'VALIDATION_FAILED')
    t.match(res.json().error.message, message)
  }
  t.equal(await prisma.project.count(), 0, 'nothing stored')
  const division = () => app.inject({ method: 'POST', url: '/unchecked/division', headers: { ...authHeader(admin), 'idempotency-key': 'div' }, payload: { name: 'x' } })
  t.same((await division()).json(), { error: { code: 'INTERNAL', message: 'Internal server error' } }, 'division by zero is a 500, its message not echoed')
  await division()
  t.equal(runs, 2, 'the retry ran again (a 500 releases the key)')
})

t.test('bad input over socket events: error ack, connection and rooms unchanged', async t => {
  const { app, url } = await build(t)
  const company = await createCompany(app)
  const other = await createCompany(app)
  const admin = company.as('admin')
  const socket = await connect(t, url, admin.token)
  const seen = record(socket)
  const server = () => app.io.of('/').sockets.get(socket.id!)
  const roomsBefore = [...server()!.rooms].sort()
  t.same(roomsBefore, [socket.id, `company:${company.id}`, `user:${admin.id}`].sort())

  const check = async (event: string, payload: unknown, code: string, what: string) => {
    const ack = await request(socket, event, payload)
    t.match(ack, { ok: false, error: { code, message: String } }, `${event} ${what}: ${code}`)
    t.ok(socket.connected, `${event} ${what}: still connected`)
    t.same([...(server()?.rooms ?? [])].sort(), roomsBefore, `${event} ${what}: rooms unchanged`)
  }

  const badResumes: Array<[string, unknown]> = [
    ['null payload', null],
    ['a string', 'company:x'],
    ['no streams', {}],
    ['empty streams', { streams: {} }],
    ['streams as an array', { streams: [`company:${company.id}`] }],
    ['negative seq', { streams: { [`company:${company.id}`]: -1 } }],
    ['fractional seq', { streams: { [`company:${company.id}`]: 1.5 } }],
    ['seq as a string', { streams: { [`company:${company.id}`]: '3' } }],
    ['not a stream name', { streams: { 'hold:company:x': 0 } }],
    ['a room id', { streams: { [socket.id!]: 0 } }],
    ['huge stream name', { streams: { [`company:${'x'.repeat(10_000)}`]: 0 } }],
    ['too many streams', { streams: Object.fromEntries(Array.from({ length: 11 }, (_v, i) => [`company:c${i}`, 0])) }],
    ['unknown field', { streams: { [`company:${company.id}`]: 0 }, join: `company:${other.id}` }]
  ]
  for (const [what, payload] of badResumes) await check('sync:resume', payload, 'VALIDATION_FAILED', what)

  const badRefreshes: Array<[string, unknown]> = [
    ['no payload', undefined],
    ['token as a number', { token: 5 }],
    ['empty token', { token: '' }],
    ['huge token', { token: 't'.repeat(10_000) }],
    ['unknown field', { token: admin.token, companyId: other.id }]
  ]
  for (const [what, payload] of badRefreshes) await check('auth:refresh', payload, 'VALIDATION_FAILED', what)

  // Events sent without an ack, or with junk arguments, are dropped without crashing anything.
  socket.emit('sync:resume', { streams: 'nope' })
  socket.emit('auth:refresh')
  socket.emit('sync:resume', 1, 2, 3)
  socket.emit('no:such:event', { streams: {} })

  if (app.hasPlugin('erp-presence')) {
    const badPresence: Array<[string, unknown]> = [
      ['unknown status', { status: 'invisible' }],
      ['status as a number', { status: 1 }],
      ['viewing without id', { status: 'online', viewing: { type: 'project' } }],
      ['unknown field', { status: 'online', companyId: other.id }]
    ]
    for (const [what, payload] of badPresence) await check('presence:set', payload, 'VALIDATION_FAILED', what)
  } else {
    t.comment('erp-presence is not registered: presence:set validation not checked here')
  }

  // A round trip after the junk proves the connection still serves requests.
  const good = await request(socket, 'sync:resume', { streams: { [`company:${company.id}`]: 0 } })
  t.match(good, { ok: true, streams: { [`company:${company.id}`]: { recovered: true, replayed: 0, headSeq: 0 } } })
  t.same([...server()!.rooms].sort(), roomsBefore, 'rooms unchanged after a successful resume')
  t.same(seen.filter(e => !['sync:head', 'presence:changed'].includes(e.event)), [], 'no domain event was delivered')
})

t.test("sync:resume for another company's stream is refused and delivers nothing", async t => {
  const { app, url } = await build(t)
  const a = await createCompany(app)
  const b = await createCompany(app)
  const adminA = a.as('admin')
  const adminB = b.as('admin')
  // Company B has history worth stealing; so does A (to prove a mixed request replays none of it).
  for (const name of ['b1', 'b2']) await app.inject({ method: 'POST', url: '/projects', headers: authHeader(adminB), payload: { name } })
  await app.inject({ method: 'POST', url: '/projects', headers: authHeader(adminA), payload: { name: 'a1' } })

  const socket: ClientSocket = await connect(t, url, adminA.token)
  const seen = record(socket)
  const server = app.io.of('/').sockets.get(socket.id!)!
  const roomsBefore = [...server.rooms].sort()

  const attempts: Array<[string, Record<string, number>]> = [
    ["the other company's stream", { [`company:${b.id}`]: 0 }],
    ["another user's stream", { [`user:${adminB.id}`]: 0 }],
    ['a colleague\'s user stream', { [`user:${a.as('member').id}`]: 0 }],
    ['own and foreign streams mixed', { [`company:${a.id}`]: 0, [`company:${b.id}`]: 0 }]
  ]
  for (const [what, streams] of attempts) {
    const ack = await request(socket, 'sync:resume', { streams })
    t.match(ack, { ok: false, error: { code: 'SYNC_STREAM_FORBIDDEN', message: String } }, what)
    t.same([...server.rooms].sort(), roomsBefore, `${what}: rooms unchanged`)
  }
  await sleep(100)
  const domain = () => seen.filter(e => !['sync:head', 'presence:changed'].includes(e.event))
  t.same(domain(), [], 'no event of either company was delivered')
  t.ok(socket.connected)

  // The own stream alone replays normally.
  const own = await request(socket, 'sync:resume', { streams: { [`company:${a.id}`]: 0 } })
  t.match(own, { ok: true, streams: { [`company:${a.id}`]: { recovered: true, replayed: 1, headSeq: 1 } } })
  t.same(domain().map(e => [e.event, e.payload.data.project.name]), [['project:created', 'a1']])
})
