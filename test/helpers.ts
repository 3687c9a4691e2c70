import { randomBytes } from 'node:crypto'
import type { Socket as NetSocket } from 'node:net'
import type { FastifyInstance } from 'fastify'
import pg from 'pg'
import { Redis } from 'ioredis'
import { io as ioClient, type ManagerOptions, type Socket as ClientSocket, type SocketOptions } from 'socket.io-client'
import { buildApp, type BuildOptions } from '../src/app.ts'
import { loadConfig, type AppConfig } from '../src/config.ts'
import { openDatabase, type Database, type PrismaClient } from '../src/db/index.ts'
import { migrate } from '../src/db/migrate.ts'
import { hashPassword } from '../src/passwords.ts'
import type { Role } from '../plugins/events.ts'

/** The PostgreSQL server integration tests use. Tests fail (never skip) when it is unreachable. */
export const TEST_POSTGRES_URL = process.env.TEST_DATABASE_URL ?? 'postgresql://postgres@127.0.0.1:5432/test'
export const TEST_REDIS_URL = process.env.TEST_REDIS_URL ?? 'redis://127.0.0.1:6379'
export const TEST_JWT_SECRET = 'test-secret-that-is-at-least-32-characters-long'

/** Minimal view of tap's Test we rely on (keeps helpers usable from any test). */
export interface TestLike {
  teardown (fn: () => unknown): void
}

export const uniqueName = (prefix: string) => `${prefix}_${Date.now().toString(36)}_${randomBytes(4).toString('hex')}`

/** A fresh, empty (not migrated) PostgreSQL database for one test, dropped at teardown. */
export async function emptyTestDatabase (t: TestLike, options: { poolSize?: number, prefix?: string, connectTimeoutMs?: number } = {}): Promise<Database & { url: string }> {
  const name = uniqueName(options.prefix ?? 'erp_test')
  const admin = new pg.Client({ connectionString: TEST_POSTGRES_URL })
  await admin.connect()
  try {
    await admin.query(`CREATE DATABASE ${name}`)
  } finally {
    await admin.end()
  }
  const url = new URL(TEST_POSTGRES_URL)
  url.pathname = `/${name}`
  const db = await openDatabase({ url: url.toString(), poolSize: options.poolSize, connectTimeoutMs: options.connectTimeoutMs })
  t.teardown(async () => {
    await db.close()
    const cleanup = new pg.Client({ connectionString: TEST_POSTGRES_URL })
    await cleanup.connect()
    await cleanup.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
    await cleanup.end()
  })
  return Object.assign(db, { url: url.toString() })
}

/**
 * A fresh, migrated PostgreSQL database for one test (dropped at teardown), or an in-memory
 * PGlite one with `{ embedded: true }`.
 */
export async function testDatabase (t: TestLike, options: { embedded?: boolean, poolSize?: number, connectTimeoutMs?: number } = {}): Promise<Database & { url?: string }> {
  if (options.embedded) {
    const db = await openDatabase({ dataDir: 'memory://' })
    t.teardown(() => db.close())
    await db.withSession(sql => migrate(sql))
    return db
  }
  const db = await emptyTestDatabase(t, { poolSize: options.poolSize, connectTimeoutMs: options.connectTimeoutMs })
  await db.withSession(sql => migrate(sql))
  return db
}

export function testConfig (overrides: Partial<AppConfig> = {}): AppConfig {
  return { ...loadConfig({ JWT_SECRET: TEST_JWT_SECRET }), port: 0, ...overrides }
}

export interface TestApp {
  app: FastifyInstance
  db: Database
  prisma: PrismaClient
  /** http://127.0.0.1:<port> */
  url: string
}

export interface BuildTestOptions {
  db?: Database
  embedded?: boolean
  config?: Partial<AppConfig>
  realtime?: BuildOptions['realtime']
  /** Extra routes (a plugin) registered after the app's own, before it listens. */
  routes?: (app: FastifyInstance) => Promise<void>
  drainTimeoutMs?: number
}

/** Builds the app on a fresh database and listens on port 0; closed at teardown. */
export async function build (t: TestLike, options: BuildTestOptions = {}): Promise<TestApp> {
  const db = options.db ?? await testDatabase(t, { embedded: options.embedded })
  const app = await buildApp({
    config: testConfig(options.config),
    db,
    realtime: { ...options.realtime, eventLog: { headIntervalMs: 0, pruneIntervalMs: 0, ...options.realtime?.eventLog } },
    drainTimeoutMs: options.drainTimeoutMs
  })
  t.teardown(() => app.close())
  if (options.routes) await app.register(options.routes)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const address = app.server.address()
  const port = typeof address === 'object' && address ? address.port : 0
  return { app, db, prisma: db.prisma, url: `http://127.0.0.1:${port}` }
}

export interface TestUser {
  id: string
  email: string
  role: Role
  token: string
}

export interface TestCompany {
  id: string
  name: string
  users: TestUser[]
  /** The first user of the given role. */
  as (role: Role): TestUser
}

let passwordHash: Promise<string> | undefined
export const TEST_PASSWORD = 'correct horse battery staple'

/** Creates a company whose users have the given roles, with signed tokens. */
export async function createCompany (app: FastifyInstance, roles: Role[] = ['admin', 'manager', 'member']): Promise<TestCompany> {
  passwordHash ??= hashPassword(TEST_PASSWORD)
  const hash = await passwordHash
  const name = uniqueName('company')
  const company = await app.prisma.company.create({ data: { name } })
  const users: TestUser[] = []
  for (const [i, role] of roles.entries()) {
    const email = `${role}${i}.${name}@example.test`.toLowerCase()
    const user = await app.prisma.user.create({
      data: { email, name: `${role} ${i}`, passwordHash: hash, memberships: { create: { companyId: company.id, role } } }
    })
    users.push({ id: user.id, email, role, token: app.erpAuth.sign({ sub: user.id, companyId: company.id, role }) })
  }
  return {
    id: company.id,
    name,
    users,
    as (role) {
      const user = users.find(u => u.role === role)
      if (!user) throw new Error(`no ${role} in ${name}`)
      return user
    }
  }
}

export type ClientOptions = Partial<ManagerOptions & SocketOptions>

/** Connects a socket.io-client (websocket only, no reconnection unless asked); disconnected at teardown. */
export function connect (t: TestLike, url: string, token: string | undefined, options: ClientOptions = {}): Promise<ClientSocket> {
  const socket = ioClient(url, { transports: ['websocket'], reconnection: false, forceNew: true, auth: token === undefined ? {} : { token }, ...options })
  t.teardown(() => { socket.disconnect() })
  return new Promise((resolve, reject) => {
    socket.once('connect', () => resolve(socket))
    socket.once('connect_error', (err) => reject(err))
  })
}

/** Connects expecting a refusal; resolves the connect_error. */
export function connectError (t: TestLike, url: string, token: string | undefined, options: ClientOptions = {}): Promise<Error & { data?: { code: string, message: string } }> {
  return connect(t, url, token, options).then(
    () => { throw new Error('expected the handshake to be refused') },
    (err: Error & { data?: { code: string, message: string } }) => err
  )
}

/** Resolves with the next `event` on `socket`, or rejects after `timeoutMs`. */
export function nextEvent<T = any> (socket: ClientSocket, event: string, timeoutMs = 5000): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      socket.off(event, onEvent)
      reject(new Error(`no ${event} within ${timeoutMs} ms`))
    }, timeoutMs)
    const onEvent = (payload: T) => {
      clearTimeout(timer)
      resolve(payload)
    }
    socket.once(event, onEvent)
  })
}

/** Emits with an ack and resolves the ack's answer. */
export function request<T = any> (socket: ClientSocket, event: string, ...args: unknown[]): Promise<T> {
  return socket.timeout(10_000).emitWithAck(event, ...args) as Promise<T>
}

/** Records every event a socket receives, in order. */
export function record (socket: ClientSocket): Array<{ event: string, payload: any }> {
  const seen: Array<{ event: string, payload: any }> = []
  socket.onAny((event: string, payload: unknown) => { seen.push({ event, payload }) })
  return seen
}

/** Records the write system calls of a TCP socket (the server end of a connection): chunks handed to the kernel per call. */
export function spyOnWrites (socket: NetSocket): number[] {
  const raw = socket as NetSocket & { _writev: (chunks: unknown[], cb: () => void) => void, _write: (chunk: unknown, enc: string, cb: () => void) => void }
  const calls: number[] = []
  const writev = raw._writev.bind(raw)
  const write = raw._write.bind(raw)
  raw._writev = (chunks, cb) => { calls.push(chunks.length); writev(chunks, cb) }
  raw._write = (chunk, enc, cb) => { calls.push(1); write(chunk, enc, cb) }
  return calls
}

export const sleep = (ms: number) => new Promise(resolve => setTimeout(resolve, ms))

/** Polls `check` until it returns true or `timeoutMs` passes. */
export async function waitFor (check: () => boolean | Promise<boolean>, timeoutMs = 5000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(20)
  }
}

/** Deletes every key under `prefix:` (SCAN, not KEYS); a Redis that is down is left alone. */
export async function dropRedisPrefix (url: string, prefix: string): Promise<void> {
  const redis = new Redis(url, { maxRetriesPerRequest: 1, retryStrategy: () => null, lazyConnect: true })
  redis.on('error', () => {})
  try {
    await redis.connect()
    let cursor = '0'
    do {
      const [next, keys] = await redis.scan(cursor, 'MATCH', `${prefix}:*`, 'COUNT', 500)
      cursor = next
      if (keys.length > 0) await redis.unlink(...keys)
    } while (cursor !== '0')
  } catch {
    // Redis already stopped (outage tests): nothing to clean there.
  } finally {
    redis.disconnect()
  }
}

export function authHeader (user: { token: string }) {
  return { authorization: `Bearer ${user.token}` }
}
