import { Agent, request, type ServerResponse } from 'node:http'
import { PassThrough } from 'node:stream'
import { setTimeout as sleep } from 'node:timers/promises'
import t, { type Test } from 'tap'
import pg from 'pg'
import { io as ioClient, type ManagerOptions, type Socket as ClientSocket, type SocketOptions } from 'socket.io-client'
import { dedicatedRedis } from './cluster-helpers.ts'
import { build, createCompany, nextEvent, uniqueName, waitFor } from './helpers.ts'

interface Answer { status?: number, connection?: string, body?: unknown, error?: string }

/**
 * One request on a kept-alive connection, as browsers and mobile HTTP stacks send them. The
 * connection is closed after the answer unless the caller passes its own agent.
 */
function send (url: string, method: string, path: string, headers: Record<string, string> = {}, body?: unknown, own?: Agent): Promise<Answer> {
  const agent = own ?? new Agent({ keepAlive: true })
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body))
  return new Promise<Answer>((resolve) => {
    const req = request(`${url}${path}`, { method, agent, headers: { ...headers, ...(payload ? { 'content-type': 'application/json', 'content-length': String(payload.length) } : {}) } }, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (chunk: string) => { text += chunk })
      const json = res.headers['content-type']?.startsWith('application/json')
      res.on('end', () => resolve({ status: res.statusCode, connection: res.headers.connection, body: json ? JSON.parse(text) : text }))
      res.on('error', (err: NodeJS.ErrnoException) => resolve({ error: err.code ?? err.message }))
    })
    req.on('error', (err: NodeJS.ErrnoException) => resolve({ error: err.code ?? err.message }))
    req.end(payload)
  }).finally(() => { if (!own) agent.destroy() })
}

/** Resolves with 'closed' when `closing` settles first, 'waiting' after `ms`. */
const settledWithin = (closing: Promise<unknown>, ms: number) =>
  Promise.race([closing.then(() => 'closed' as const), sleep(ms, 'waiting' as const)])

t.test('POST /projects in flight at shutdown commits, answers 201 and stores its idempotent response (forceCloseConnections: true reset it)', async (t) => {
  const { app, db, url } = await build(t, { drainTimeoutMs: 30_000 })
  const company = await createCompany(app, ['admin'])
  const admin = company.as('admin')
  // Another session holds a lock the route's INSERT must wait for: the request is in flight
  // for as long as the test wants.
  const locker = new pg.Client({ connectionString: (db as { url?: string }).url })
  await locker.connect()
  t.teardown(() => locker.end())
  await locker.query('BEGIN')
  await locker.query('LOCK TABLE projects IN EXCLUSIVE MODE')

  const answer = send(url, 'POST', '/projects', { authorization: `Bearer ${admin.token}`, 'idempotency-key': 'deploy-1' }, { name: 'Harbour wall' })
  await waitFor(async () => (await locker.query<{ n: number }>(
    `SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`)).rows[0]!.n > 0, 5000, 'the INSERT to wait for the lock')

  const closing = app.close()
  t.equal(await settledWithin(closing, 300), 'waiting', 'close waits for the request in flight')
  await locker.query('COMMIT')

  const { status, connection, body, error } = await answer
  t.equal(error, undefined, 'the connection was not reset')
  t.equal(status, 201, 'the change is answered')
  t.equal(connection, 'close', 'with Connection: close, so the client does not reuse the connection')
  t.equal(await settledWithin(closing, 5000), 'closed', 'close resolves once the request is answered, not after keepAliveTimeout (72 s)')

  const project = (body as { project: { id: string } }).project
  t.ok(await db.prisma.project.findUnique({ where: { id: project.id } }), 'the project is committed')
  const record = await db.prisma.idempotencyRecord.findFirst({ where: { companyId: company.id, userId: admin.id, key: 'deploy-1' } })
  t.equal(record?.statusCode, 201, 'the Idempotency-Key has its response: a retry after the restart replays it instead of waiting out the claim')
})

t.test('a request still running when drainTimeoutMs ends is cut off, and close resolves', async (t) => {
  let release!: () => void
  const released = new Promise<void>(resolve => { release = resolve })
  let entered!: () => void
  const inHandler = new Promise<void>(resolve => { entered = resolve })
  t.teardown(() => release())
  const { app, url } = await build(t, {
    drainTimeoutMs: 200,
    routes: async (app) => {
      app.get('/test/stuck', async () => {
        entered()
        await released
        return { ok: true }
      })
    }
  })
  const answer = send(url, 'GET', '/test/stuck')
  await inHandler
  const closing = app.close()
  t.equal(await settledWithin(closing, 100), 'waiting', 'the request gets its drain time')
  t.ok((await answer).error, 'after drainTimeoutMs its connection is destroyed')
  t.equal(await settledWithin(closing, 5000), 'closed', 'close resolves')
})

t.test('a response already streaming when close starts: its connection is closed once idle, not after keepAliveTimeout', async (t) => {
  const body = new PassThrough()
  let response: ServerResponse | undefined
  const { app, url } = await build(t, {
    drainTimeoutMs: 30_000,
    routes: async (app) => {
      app.get('/test/stream', async (_request, reply) => {
        response = reply.raw
        return reply.type('text/plain').send(body)
      })
    }
  })
  // The client keeps the connection open after the answer: only the server can close it.
  const agent = new Agent({ keepAlive: true })
  t.teardown(() => agent.destroy())
  const answer = send(url, 'GET', '/test/stream', {}, undefined, agent)
  body.write('first ')
  // Close starts once the headers went out: after a fixed 100 ms, a request not yet handled on a
  // loaded machine was cut when close started (no answer at all).
  await waitFor(() => response?.headersSent === true, 10_000, 'the response headers to go out')
  await sleep(50) // and the first chunk with them
  const closing = app.close()
  t.equal(await settledWithin(closing, 200), 'waiting', 'close waits for the response')
  body.end('last')
  const { status, connection, body: text } = await answer
  t.equal(status, 200)
  t.equal(text, 'first last')
  t.not(connection, 'close', 'its headers went out before closing began, without Connection: close')
  t.equal(await settledWithin(closing, 5000), 'closed', 'close resolves once the connection is idle')
})

/** An app with one member and a Socket.IO client of theirs, connected (websocket unless told otherwise). */
async function appWithClient (t: Test, options: Partial<ManagerOptions & SocketOptions> = {}) {
  const { app, url } = await build(t, { drainTimeoutMs: 30_000 })
  const company = await createCompany(app, ['member'])
  const client = () => ioClient(url, { transports: ['websocket'], reconnection: false, forceNew: true, auth: { token: company.as('member').token }, ...options })
  const socket = client()
  t.teardown(() => socket.disconnect())
  await nextEvent(socket, 'connect', 5000)
  return { app, socket, client }
}

/** Makes a connected websocket client stop reading from its TCP connection. */
function silence (socket: ClientSocket): void {
  ;(socket.io.engine.transport as unknown as { ws: { _socket: { pause (): void } } }).ws._socket.pause()
}

t.test('a long-polling Socket.IO client gets server:shutdown and does not hold close for keepAliveTimeout', async (t) => {
  const { app, socket } = await appWithClient(t, { transports: ['polling'] })
  const notice = nextEvent(socket, 'server:shutdown', 5000)
  const disconnected = nextEvent(socket, 'disconnect', 5000)
  const closing = app.close()
  t.match(await notice, { message: /reconnect and resume/ }, 'the client is told, though it was between two polls')
  t.equal(await settledWithin(closing, 5000), 'closed', 'close resolves')
  t.ok(await disconnected, 'and it is disconnected')
})

for (const transport of ['websocket', 'polling'] as const) {
  t.test(`a ${transport} client told server:shutdown is closed at the transport and reconnects by itself (regression, websocket: it was disconnected as by the server, "io server disconnect", and stayed disconnected)`, async (t) => {
    // Reconnection on, as in real clients; the first attempt far away (the node is gone).
    const { app, socket } = await appWithClient(t, { transports: [transport], reconnection: true, reconnectionDelay: 60_000, reconnectionDelayMax: 60_000 })
    const notice = nextEvent(socket, 'server:shutdown', 5000)
    const reason = nextEvent<string>(socket, 'disconnect', 5000)
    await app.close()
    t.match(await notice, { message: /reconnect and resume/ })
    t.not(await reason, 'io server disconnect', 'a connection closed, not a server disconnect')
    t.equal(socket.active, true, 'the client reconnects by itself')
  })
}

// Regression: closing waited for every connection to flush what it had been sent, so a client
// that stopped reading (its TCP window full) held app.close() until its ping timeout.
t.test('a websocket client that stopped reading does not hold close', async (t) => {
  const { app, socket } = await appWithClient(t)
  // The client's TCP socket stops reading; the server's sends then fill the buffers on both sides.
  silence(socket)
  const big = 'x'.repeat(1 << 20)
  for (let i = 0; i < 32; i++) {
    app.io.local.emit('server:shutdown', { message: big })
    await sleep(5)
  }
  const started = Date.now()
  t.equal(await settledWithin(app.close(), 5000), 'closed', `close resolved in ${Date.now() - started} ms`)
})

// Regression (review): only a client whose unsent frames filled engine.io's queue was cut; one
// that stopped reading with nothing queued (a phone that lost its network) held close for ws's
// 30 s closing handshake.
t.test('a websocket client that went silent with nothing queued does not hold close', async (t) => {
  const { app, socket } = await appWithClient(t)
  silence(socket)
  const started = Date.now()
  t.equal(await settledWithin(app.close(), 5000), 'closed', `close resolved in ${Date.now() - started} ms`)
})

// Regression (review): connections were closed once, when close began; a client that connected
// during the wait for the notice or the grace got no notice and held close for as long as it
// stayed (engine.io answers its handshake itself, past Fastify's 503 while closing).
t.test('a client connecting while the node closes is refused and does not hold close', async (t) => {
  // A silent client keeps close in its grace period for a moment.
  const { app, socket, client } = await appWithClient(t)
  silence(socket)
  const started = Date.now()
  const closing = app.close()
  await sleep(300)
  const late = client()
  t.teardown(() => late.disconnect())
  const outcome = await Promise.race([
    nextEvent(late, 'connect', 5000).then(() => 'connected'),
    nextEvent(late, 'connect_error', 5000).then(() => 'refused')
  ])
  t.equal(outcome, 'refused')
  t.equal(await settledWithin(closing, 5000), 'closed', `close resolved in ${Date.now() - started} ms`)
})

t.test('regression: a Socket.IO handshake still in its membership query when close starts held close open', async (t) => {
  const { app, db, url } = await build(t, { drainTimeoutMs: 30_000 })
  const company = await createCompany(app, ['member'])
  const locker = new pg.Client({ connectionString: (db as { url?: string }).url })
  await locker.connect()
  t.teardown(() => locker.end())
  await locker.query('BEGIN')
  await locker.query('LOCK TABLE memberships IN ACCESS EXCLUSIVE MODE')
  const socket = ioClient(url, { transports: ['websocket'], reconnection: false, forceNew: true, auth: { token: company.as('member').token } })
  t.teardown(() => socket.disconnect())
  let connected = false
  socket.on('connect', () => { connected = true })
  await waitFor(async () => (await locker.query<{ n: number }>(
    `SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`)).rows[0]!.n > 0, 5000, 'the handshake query to wait for the lock')

  const closing = app.close()
  await sleep(100)
  await locker.query('COMMIT') // the handshake's check now succeeds, after close began
  t.equal(await settledWithin(closing, 5000), 'closed', 'close resolves; before, the socket connected after preClose and kept the server open')
  t.notOk(connected, 'the handshake is dropped, not completed on a closing node')
  t.equal(app.io.of('/').sockets.size, 0)
})

t.test('regression: close hung while Redis was down (QUIT queued behind the adapter\'s unsubscribes)', async (t) => {
  const redis = await dedicatedRedis(t)
  const { app } = await build(t, { realtime: { socket: { redis: redis.url, redisPrefix: uniqueName('shutdown') } } })
  await redis.stop()
  await waitFor(() => app.erpSocket.adapterStatus() === 'down', 5000, 'the adapter to notice the outage')
  t.equal(await settledWithin(app.close(), 5000), 'closed', 'close resolves without Redis')
})

t.test('drainTimeoutMs is validated', async (t) => {
  await t.rejects(build(t, { drainTimeoutMs: -1 }), /drainTimeoutMs must be a whole number/)
})
