import { mkdir, open, readFile, rm, stat } from 'node:fs/promises'
import path from 'node:path'
import pg from 'pg'
import { PrismaPg } from '@prisma/adapter-pg'
import { PrismaClient } from '../generated/prisma/client.ts'
import type { SqlRunner } from './migrate.ts'

export { PrismaClient }
export type { Prisma } from '../generated/prisma/client.ts'

export type DatabaseKind = 'postgresql' | 'pglite'

export interface Database {
  kind: DatabaseKind
  prisma: PrismaClient
  /** Runs `fn` on one dedicated connection (session-level locks hold): used by the migration runner. */
  withSession<T> (fn: (sql: SqlRunner) => Promise<T>): Promise<T>
  close (): Promise<void>
}

export interface DatabaseOptions {
  /** PostgreSQL connection string; when absent an embedded PGlite database is used. */
  url?: string
  /** Directory of the embedded database (PGlite); `memory://` keeps it in memory. */
  dataDir?: string
  /** pg pool size (PostgreSQL only). Default 10. */
  poolSize?: number
  /**
   * How many distinct SQL texts get a prepared-statement name (PostgreSQL only; see
   * `statementNames`). Default 200; 0 sends every statement unnamed, as PgBouncer's transaction
   * mode needs before 1.21.
   */
  preparedStatements?: number
  /**
   * PostgreSQL only: how long getting a connection may take, waiting for a free pool slot
   * included (pg's `connectionTimeoutMillis`); past it the query fails with pg-pool's "timeout
   * exceeded when trying to connect" (503 through `databaseUnreachable`). Default 5000; 0 waits
   * without limit.
   */
  connectTimeoutMs?: number
  /**
   * PostgreSQL only: how long one statement may wait for PostgreSQL's reply, counted from when it
   * is handed to its connection. Past it the connection is closed (a server or network that stopped
   * answering leaves it unusable) and the statement fails with an `ETIMEDOUT` socket error, which
   * `@prisma/adapter-pg` maps to `SocketTimeout` (503 through `databaseUnreachable`). Client-side,
   * so it also covers a black-holed network; the statement itself may still run on the server.
   * `withSession` (migrations: long DDL) is not bounded; the wait for another node's
   * migration lock is bounded by the runner (`lockTimeoutMs`). Default 30000, above the interactive transactions' own limits (offline-queue 15 s
   * per transaction); 0 waits without limit.
   */
  queryTimeoutMs?: number
}

/**
 * `@prisma/adapter-pg`'s `statementNameGenerator`: the first `max` distinct SQL texts get a name,
 * so each pool connection parses and plans such a statement once and then only binds and runs
 * it. Prisma sends every statement unnamed otherwise, and PostgreSQL parses and plans it on every
 * call. POST /projects' one-statement write went from 1.75 to 1.27 ms (p50 at 50 calls/s,
 * through Prisma; README, Performance, item 11). Every SQL text past `max` goes unnamed: the cap
 * bounds what each connection keeps prepared when texts vary (lists spelled out, say). A name
 * always means the same text, which pg requires.
 */
export function statementNames (max: number): (query: { sql: string }) => string {
  const names = new Map<string, string>()
  return ({ sql }) => {
    let name = names.get(sql)
    if (name === undefined && names.size < max) names.set(sql, name = `erp_${names.size}`)
    // An empty name is pg's unnamed statement.
    return name ?? ''
  }
}

/** Thrown (through the statement's callbacks) when PostgreSQL did not answer within the query bound. */
export function queryTimeoutError (timeoutMs: number): Error & { code: 'ETIMEDOUT' } {
  return Object.assign(new Error(`PostgreSQL sent no reply within ${timeoutMs} ms (DATABASE_QUERY_TIMEOUT_MS); connection closed`), { code: 'ETIMEDOUT' as const })
}

type Callback = (err: Error | null, result?: unknown) => void

/**
 * Errors of a named (prepared) statement that say the schema changed under it: the result type
 * (`cached plan must not change result type`) or a parameter's type (its type was fixed when the
 * statement was prepared) no longer match. They repeat on every use of that statement on that
 * connection.
 */
const STALE_PLAN_CODES = new Set(['0A000', '42883', '42804'])
const stalePlan = (err: unknown, config: unknown): boolean =>
  typeof (config as { name?: unknown } | null)?.name === 'string' && (config as { name: string }).name !== '' &&
  STALE_PLAN_CODES.has((err as { code?: string } | null)?.code ?? '')

/** A COMMIT statement, as a query text or config. */
const isCommit = (query: unknown) => /^\s*(COMMIT|END)\s*;?\s*$/i.test(typeof query === 'string' ? query : String((query as { text?: unknown } | null)?.text ?? ''))
/** As PostgreSQL raises it for a statement in an aborted transaction (so drivers map it as theirs). */
const abortedCommit = () => Object.assign(new Error('current transaction is aborted: a statement in it failed (its error was caught), so PostgreSQL rolled it back instead of committing it'), { code: '25P02', severity: 'ERROR' })

/**
 * A pg client whose statements are bounded: a statement without a reply after `queryTimeoutMs`
 * destroys the connection with `queryTimeoutError`, so pg fails it and every statement queued
 * behind it, and the pool drops the client. pg's own `query_timeout` is not used: it rejects
 * with a code-less "Query read timeout" that `@prisma/adapter-pg` does not map (no 503), and it
 * leaves the hung statement on the connection, which an interactive transaction then returns to
 * the pool (`release()` without an error), so the next user queues behind it.
 */
function boundedClient (queryTimeoutMs: number): typeof pg.Client {
  return class BoundedClient extends pg.Client {
    /** 0 while `withSession` holds the client (migrations are not bounded). */
    queryTimeoutMs = queryTimeoutMs

    /** Set when a prepared statement no longer matches the schema: the pool drops the client on release. */
    hasStalePlan = false

    override query (...args: unknown[]): any {
      const timeoutMs = this.queryTimeoutMs
      // Submittables (cursors, streams) report on their own; they are not used here.
      if (typeof (args[0] as { submit?: unknown } | null)?.submit === 'function') {
        return (super.query as (...a: unknown[]) => unknown)(...args)
      }
      const timer = timeoutMs > 0
        ? setTimeout(() => {
          (this as unknown as { connection: { stream: { destroy (err: Error): void } } }).connection.stream.destroy(queryTimeoutError(timeoutMs))
        }, timeoutMs)
        : undefined
      const settled = (err: unknown) => {
        clearTimeout(timer)
        if (err && stalePlan(err, args[0])) this.hasStalePlan = true
      }
      const last = args.length - 1
      if (typeof args[last] === 'function') {
        const callback = args[last] as Callback
        args[last] = (err: Error | null, result?: unknown) => { settled(err); callback(err, result) }
        return (super.query as (...a: unknown[]) => unknown)(...args)
      }
      // A COMMIT in a transaction a failed statement aborted (its error caught by the caller):
      // PostgreSQL answers it with ROLLBACK, which Prisma does not report, so the transaction would
      // resolve as committed. Its command tag says so, and the COMMIT fails instead
      // (erp-offline-queue's `abortedCheck: 'driver'` relies on this, in place of a statement more
      // per transaction). The tag, not the session's status before sending: the error of the
      // failed statement can reach the caller before the status that follows it.
      const commit = isCommit(args[0])
      try {
        return ((super.query as (...a: unknown[]) => Promise<unknown>)(...args)).then(
          result => {
            settled(null)
            if (commit && (result as { command?: unknown } | undefined)?.command === 'ROLLBACK') throw abortedCommit()
            return result
          },
          (err: unknown) => { settled(err); throw err })
      } catch (err) {
        clearTimeout(timer)
        throw err
      }
    }
  }
}

/** Opens PostgreSQL through @prisma/adapter-pg, or embedded PGlite when no URL is given. */
export async function openDatabase (options: DatabaseOptions = {}): Promise<Database> {
  if (options.url) {
    const pool = new pg.Pool({
      connectionString: options.url,
      max: options.poolSize ?? 10,
      // Without these a hung server or a black-holed network left requests waiting without limit.
      connectionTimeoutMillis: options.connectTimeoutMs ?? 5000,
      keepAlive: true,
      keepAliveInitialDelayMillis: 10_000,
      Client: boundedClient(options.queryTimeoutMs ?? 30_000)
    })
    // An idle client's error (server restart) must not crash the process; the next query fails instead.
    pool.on('error', () => {})
    // A migration changed the type of something a prepared statement reads: that statement fails
    // on this connection until it is prepared again. The pool drops a connection whose query
    // failed, but an interactive transaction releases its connection without an error (after
    // ROLLBACK), so every later transaction on it failed the same way. Ending it here makes the
    // pool drop it (it checks `_ending` right after this event); a new one prepares afresh.
    pool.on('release', (err: Error | undefined, client: pg.PoolClient) => {
      if (!err && (client as unknown as { hasStalePlan?: boolean }).hasStalePlan) void client.end().catch(() => {})
    })
    const preparedStatements = options.preparedStatements ?? 200
    const prisma = new PrismaClient({ adapter: new PrismaPg(pool, preparedStatements > 0 ? { statementNameGenerator: statementNames(preparedStatements) } : {}) })
    let closed = false
    return {
      kind: 'postgresql',
      prisma,
      async withSession (fn) {
        const client = await pool.connect()
        const bounded = client as unknown as { queryTimeoutMs: number }
        const timeoutMs = bounded.queryTimeoutMs
        bounded.queryTimeoutMs = 0
        // A connection lost mid-session fails the running statement; the event must not crash the process.
        const onError = () => {}
        client.on('error', onError)
        try {
          return await fn({
            exec: async (script) => { await client.query(script) },
            query: async (text, params) => (await client.query(text, params as unknown[])).rows,
            // From the server's ReadyForQuery status: 'T' in a transaction block, 'E' in a failed one.
            inTransaction: () => client.getTransactionStatus() !== 'I'
          })
        } finally {
          bounded.queryTimeoutMs = timeoutMs
          client.removeListener('error', onError)
          // Not back to the pool: whatever the session set (a migration's `SET
          // session_replication_role`, `SET ROLE`, a search_path) must not reach the app's queries.
          client.release(true)
        }
      },
      async close () {
        if (closed) return
        closed = true
        await prisma.$disconnect()
        await pool.end()
      }
    }
  }
  const [{ PGlite }, { PrismaPGlite }] = await Promise.all([
    import('@electric-sql/pglite'),
    import('pglite-prisma-adapter')
  ])
  const dataDir = options.dataDir ?? '.data/pglite'
  let unlock = async () => {}
  if (!dataDir.startsWith('memory://')) {
    await mkdir(path.resolve(dataDir), { recursive: true })
    unlock = await lockDataDir(path.resolve(dataDir))
  }
  let pglite: InstanceType<typeof PGlite>
  try {
    pglite = await PGlite.create(dataDir)
  } catch (err) {
    await unlock()
    throw err
  }
  const prisma = new PrismaClient({ adapter: new PrismaPGlite(pglite) })
  let closed = false
  return {
    kind: 'pglite',
    prisma,
    // PGlite has one session, the app's too: what the session set is reset afterwards.
    withSession: async (fn) => {
      try {
        return await fn({
          exec: async (script) => { await pglite.exec(script) },
          query: async (text, params) => (await pglite.query(text, params as unknown[])).rows as Record<string, unknown>[],
          inTransaction: () => pglite.isInTransaction()
        })
      } finally {
        await pglite.exec('RESET ALL; RESET ROLE; RESET SESSION AUTHORIZATION').catch(() => {})
      }
    },
    async close () {
      if (closed) return
      closed = true
      try {
        await prisma.$disconnect().finally(() => pglite.close())
      } finally {
        // Even when closing failed: the directory is not held by this process any more.
        await unlock()
      }
    }
  }
}

/** The embedded database's directory is open in another process (or already in this one). */
export class DatabaseInUseError extends Error {
  override name = 'DatabaseInUseError'
}

/** Data directories this process holds open. */
const heldDataDirs = new Set<string>()
// A lock file without a readable pid is taken over only once this old: its owner may be between
// creating it and writing its pid.
const UNREADABLE_LOCK_STALE_MS = 10_000

/**
 * PGlite has no lock of its own: two processes on one data directory (`npm run db:seed` while
 * `npm start` runs) each write their own copy, and the last to close wins (the other's rows are
 * lost). `<dir>.lock` holds the owner's pid. A lock is taken over when its process is gone, or
 * when it names this process but this process does not hold it (a container restarted after a
 * crash gets the same pid); a lock without a readable pid only once it is 10 s old.
 */
async function lockDataDir (dir: string): Promise<() => Promise<void>> {
  const lockPath = `${dir}.lock`
  const inUse = (owner: number | undefined) => new DatabaseInUseError(owner === undefined
    ? `the embedded database in ${dir} is in use (${lockPath} is being created by another process): stop it first (or give each its own DATA_DIR)`
    : `the embedded database in ${dir} is in use by process ${owner}${owner === process.pid ? ' (this one)' : ''}: stop it first (or give each its own DATA_DIR)`)
  if (heldDataDirs.has(dir)) throw inUse(process.pid)
  // Held from here, before the first await: two opens of one directory in this process both
  // found it free, and the second took the first's fresh lock over as one naming itself.
  heldDataDirs.add(dir)
  try {
    await takeLock(lockPath, inUse)
  } catch (err) {
    heldDataDirs.delete(dir)
    throw err
  }
  return async () => {
    // Only a lock that is still ours: one taken over meanwhile belongs to its new owner. Held
    // until the file is gone: an open in this process meanwhile took the lock naming this pid over,
    // and then ran without one once it was removed here.
    try {
      if ((await readFile(lockPath, 'utf8').catch(() => '')).trim() === String(process.pid)) await rm(lockPath, { force: true })
    } finally {
      heldDataDirs.delete(dir)
    }
  }
}

async function takeLock (lockPath: string, inUse: (owner: number | undefined) => DatabaseInUseError): Promise<void> {
  const create = async () => {
    const handle = await open(lockPath, 'wx')
    await handle.writeFile(String(process.pid))
    await handle.close()
  }
  // The lock's content, or undefined when there is no lock file.
  const read = () => readFile(lockPath, 'utf8').then(text => text.trim(), (err: NodeJS.ErrnoException) => err.code === 'ENOENT' ? undefined : '')
  let content: string | undefined
  // Twice at most: a lock that vanished before it could be read (its owner closed) is no stale
  // lock to take over (that compared equal to a new, still empty one), just one to create again.
  for (let attempt = 0; content === undefined; attempt++) {
    try {
      return await create()
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err
    }
    content = await read()
    if (content === undefined && attempt > 0) throw inUse(undefined)
  }
  // Which file was judged: the takeover below removes only that one, not a newer lock that a
  // process created meanwhile (still empty, or with the same content).
  const judged = await stat(lockPath).catch(() => undefined)
  const identity = (info: { ino: number, mtimeMs: number } | undefined) => info && `${info.ino}:${info.mtimeMs}`
  const owner = pidOf(content)
  const stale = owner === undefined
    ? Date.now() - (judged?.mtimeMs ?? Date.now()) > UNREADABLE_LOCK_STALE_MS
    : owner === process.pid || !processAlive(owner)
  if (!stale) throw inUse(owner)
  // Taking a stale lock over is read, remove, create: two processes doing it at once could each
  // remove the lock the other had just created, and both open the directory. So the takeover runs
  // under `<lock>.takeover` (mkdir is atomic), and reads the lock again inside it: another
  // process that took over first has replaced the content, and wins.
  const mutex = `${lockPath}.takeover`
  try {
    await mkdir(mutex)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err
    // A takeover takes milliseconds: one this old was left by a process that died in it. Not
    // removed here: a check of its age and a removal are two steps, and between them another
    // process may have replaced it with its own live one (which would then run beside a second).
    if (Date.now() - ((await stat(mutex).catch(() => undefined))?.mtimeMs ?? Date.now()) > UNREADABLE_LOCK_STALE_MS) {
      throw new DatabaseInUseError(`the embedded database lock ${lockPath} cannot be taken over: ${mutex} was left by a process that stopped while taking over its stale lock; remove that directory (no other process is starting on this DATA_DIR) and start again`)
    }
    throw inUse(undefined)
  }
  try {
    const now = await read()
    if (now !== content || identity(await stat(lockPath).catch(() => undefined)) !== identity(judged) || judged === undefined) {
      throw inUse(pidOf(now))
    }
    await rm(lockPath, { force: true })
    try {
      await create()
    } catch (err) {
      // Another process's first try (no takeover needed) created it after the remove.
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw inUse(undefined)
      throw err
    }
  } finally {
    await rm(mutex, { recursive: true, force: true })
  }
}

/** The pid a lock file holds, if it holds one. */
const pidOf = (content: string | undefined) => content !== undefined && /^\d+$/.test(content) ? Number(content) : undefined

function processAlive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}
