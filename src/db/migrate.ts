import { createHash, randomUUID } from 'node:crypto'
import { readdir, readFile } from 'node:fs/promises'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

/** The two things the runner needs from a database connection. */
export interface SqlRunner {
  exec (script: string): Promise<void>
  query (text: string, params?: unknown[]): Promise<Record<string, unknown>[]>
  /** Whether the session is inside a transaction block (a script's `BEGIN` left open); without it that check is skipped. */
  inTransaction? (): boolean
}

export const DEFAULT_MIGRATIONS_DIR = fileURLToPath(new URL('../../prisma/migrations', import.meta.url))

// Same lock id as Prisma's schema engine, so this runner and `prisma migrate deploy` exclude each other.
const ADVISORY_LOCK_ID = 72707369

// Bookkeeping table exactly as `prisma migrate deploy` creates it.
const CREATE_MIGRATIONS_TABLE = `CREATE TABLE IF NOT EXISTS "public"."_prisma_migrations" (
  "id" VARCHAR(36) PRIMARY KEY NOT NULL,
  "checksum" VARCHAR(64) NOT NULL,
  "finished_at" TIMESTAMPTZ,
  "migration_name" VARCHAR(255) NOT NULL,
  "logs" TEXT,
  "rolled_back_at" TIMESTAMPTZ,
  "started_at" TIMESTAMPTZ NOT NULL DEFAULT now(),
  "applied_steps_count" INTEGER NOT NULL DEFAULT 0
)`

export interface MigrationResult {
  applied: string[]
  alreadyApplied: string[]
}

export interface MigrateOptions {
  /**
   * How long to wait for the migration lock another session holds, in ms (default 10000, as
   * `prisma migrate deploy`). Past it the run fails with a MigrationError naming the holder,
   * instead of hanging behind a session that will never let go.
   */
  lockTimeoutMs?: number
}

export const DEFAULT_MIGRATION_LOCK_TIMEOUT_MS = 10_000
const LOCK_POLL_MS = 100

export class MigrationError extends Error {
  constructor (message: string, public readonly migration?: string) {
    super(message)
    this.name = 'MigrationError'
  }
}

/** The schema the app's Prisma queries name (`"public"."users"`): migrations create their tables there. */
const SCHEMA = 'public'

/**
 * Whether `recorded` is the checksum of `script` as Prisma accepts it: the SHA-256 of its bytes,
 * also with its line endings the other way (a checkout that turned LF into CRLF, or back), and in
 * the unpadded hex older Prisma versions wrote (each byte without its leading zero).
 */
export function checksumMatches (recorded: string, script: string): boolean {
  const variants = [script, script.replace(/\r\n/g, '\n'), script.replace(/\r?\n/g, '\r\n')]
  return variants.some(text => {
    const digest = createHash('sha256').update(text).digest()
    return recorded === digest.toString('hex') || recorded === [...digest].map(byte => byte.toString(16)).join('')
  })
}

/**
 * Applies pending migrations from `prisma/migrations/<name>/migration.sql` in name order,
 * recording them in `_prisma_migrations` with the SHA-256 checksum Prisma uses. Each script is
 * sent as one simple query, as `prisma migrate deploy` sends it: PostgreSQL runs its statements
 * in one implicit transaction (all or nothing), and a script of one statement that cannot run
 * in a transaction (`CREATE INDEX CONCURRENTLY`, in a migration of its own) runs. Tables go to
 * the public schema whatever the session's `search_path` (the app's queries name it).
 * Idempotent; refuses to continue past a failed or edited migration.
 */
/** The migration folders of `dir`, in the order they apply. */
async function migrationNames (dir: string): Promise<string[]> {
  return (await readdir(dir, { withFileTypes: true }))
    .filter(entry => entry.isDirectory())
    .map(entry => entry.name)
    .sort()
}

/**
 * The migrations of `dir` the database has not applied (every one when it was never migrated).
 * Reads only: it takes no lock and creates nothing, so a script that needs the schema can refuse
 * with one line instead of failing on a missing table.
 */
export async function pendingMigrations (sql: SqlRunner, dir = DEFAULT_MIGRATIONS_DIR): Promise<string[]> {
  const names = await migrationNames(dir)
  const [table] = await sql.query(`SELECT (to_regclass('"public"."_prisma_migrations"') IS NOT NULL)::int AS present`)
  if (Number(table?.present) !== 1) return names
  const rows = await sql.query('SELECT migration_name FROM "public"."_prisma_migrations" WHERE finished_at IS NOT NULL AND rolled_back_at IS NULL')
  const applied = new Set(rows.map(row => String(row.migration_name)))
  return names.filter(name => !applied.has(name))
}

export async function migrate (sql: SqlRunner, dir = DEFAULT_MIGRATIONS_DIR, options: MigrateOptions = {}): Promise<MigrationResult> {
  const { lockTimeoutMs = DEFAULT_MIGRATION_LOCK_TIMEOUT_MS } = options
  if (!Number.isSafeInteger(lockTimeoutMs) || lockTimeoutMs < 0) {
    throw new TypeError(`migrate: lockTimeoutMs must be a whole number of ms ≥ 0, got ${String(lockTimeoutMs)}`)
  }
  const names = await migrationNames(dir)
  await acquireLock(sql, lockTimeoutMs)
  try {
    // Session-wide, reset below: a schema named like the role ("$user", first on the default
    // search_path) would otherwise receive every table, where the app's queries do not look.
    await sql.exec(`SET search_path TO "${SCHEMA}"`)
    await sql.exec(CREATE_MIGRATIONS_TABLE)
    const rows = await sql.query(
      'SELECT migration_name, checksum, finished_at, rolled_back_at FROM "public"."_prisma_migrations" ORDER BY started_at'
    )
    const recorded = new Map<string, Record<string, unknown>>()
    for (const row of rows) {
      if (row.rolled_back_at != null) continue
      if (row.finished_at == null) {
        throw new MigrationError(`migration ${String(row.migration_name)} failed earlier and was not resolved; fix the database, then mark it rolled back`, String(row.migration_name))
      }
      recorded.set(String(row.migration_name), row)
    }
    // Every script read and every applied one's checksum compared before anything runs: an
    // edited migration found halfway through the list left the earlier pending ones applied.
    const scripts = new Map<string, string>()
    for (const name of names) {
      const script = await readFile(path.join(dir, name, 'migration.sql'), 'utf8').catch((err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT') throw new MigrationError(`migration ${name} has no migration.sql`, name)
        throw err
      })
      const done = recorded.get(name)
      if (done && !checksumMatches(String(done.checksum), script)) {
        throw new MigrationError(`migration ${name} was edited after it was applied (checksum mismatch)`, name)
      }
      scripts.set(name, script)
    }
    const result: MigrationResult = { applied: [], alreadyApplied: [] }
    for (const [name, script] of scripts) {
      if (recorded.has(name)) {
        result.alreadyApplied.push(name)
        continue
      }
      const checksum = createHash('sha256').update(script).digest('hex')
      const id = randomUUID()
      await sql.query(
        'INSERT INTO "public"."_prisma_migrations" (id, checksum, migration_name, started_at, applied_steps_count) VALUES ($1, $2, $3, now(), 0)',
        [id, checksum, name]
      )
      try {
        // The script as is: not glued to a `BEGIN;`/`COMMIT;` (a last statement without its
        // semicolon was then a syntax error), nor inside an explicit transaction (which refuses
        // CREATE INDEX CONCURRENTLY). Its statements share the implicit transaction of one query.
        // Before each script: one may change the search_path for the rest of the session.
        await sql.exec(`SET search_path TO "${SCHEMA}"`)
        await sql.exec(script)
        // A `BEGIN` without its `COMMIT` leaves the session in a transaction that nothing would
        // commit: the script would count as applied, then vanish with the connection.
        if (sql.inTransaction?.()) throw new Error('the script left a transaction open (a BEGIN without its COMMIT); nothing of it was applied')
      } catch (err) {
        // A script with its own BEGIN that failed leaves the session in an aborted transaction.
        await sql.exec('ROLLBACK').catch(() => {})
        await resetSession(sql)
        const message = err instanceof Error ? err.message : String(err)
        await sql.query('UPDATE "public"."_prisma_migrations" SET logs = $2 WHERE id = $1', [id, message])
        throw new MigrationError(`migration ${name} failed: ${message}`, name)
      }
      // A script may have switched role (SET ROLE, SET SESSION AUTHORIZATION): the bookkeeping
      // and the next scripts run as the runner's own user, as Prisma's do on a new connection.
      await resetSession(sql)
      await sql.query(
        'UPDATE "public"."_prisma_migrations" SET finished_at = now(), applied_steps_count = 1 WHERE id = $1',
        [id]
      )
      result.applied.push(name)
    }
    return result
  } finally {
    await sql.exec('RESET search_path').catch(() => {})
    await sql.query('SELECT pg_advisory_unlock($1)', [ADVISORY_LOCK_ID])
  }
}

/** Back to the runner's own user after a script that changed it. */
async function resetSession (sql: SqlRunner): Promise<void> {
  await sql.exec('RESET SESSION AUTHORIZATION; RESET ROLE')
}

/**
 * Takes the migration lock, polling `pg_try_advisory_lock` rather than blocking in
 * `pg_advisory_lock`: a blocked call cannot be bounded without changing the session's
 * `lock_timeout`, and a session left holding the lock (a runner stuck or killed without its
 * connection closing) would otherwise hang every later start.
 */
async function acquireLock (sql: SqlRunner, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    // As an int: any SqlRunner answers that the same way (a boolean may come back as 't').
    const [row] = await sql.query('SELECT pg_try_advisory_lock($1)::int AS locked', [ADVISORY_LOCK_ID])
    if (Number(row?.locked) === 1) return
    if (Date.now() >= deadline) break
    await new Promise(resolve => setTimeout(resolve, Math.min(LOCK_POLL_MS, Math.max(1, deadline - Date.now()))))
  }
  // Advisory locks on one bigint key have classid = its high 32 bits and objid = its low ones.
  const holders = await sql.query(
    // Another role's session shows no state or start without pg_read_all_stats: said so, not "null".
    `SELECT a.pid, a.usename, a.application_name, coalesce(a.state, 'state not visible') AS state,
            coalesce(floor(extract(epoch FROM now() - a.backend_start))::int::text || ' s', 'for an unknown time') AS connected
     FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
     WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objid = $1 AND l.objsubid = 1
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())`,
    [ADVISORY_LOCK_ID]
  )
  // The holder may have let go since the last try: then there is no one to name.
  const holder = holders[0]
  const who = holder === undefined
    ? 'another session'
    : `session pid ${String(holder.pid)} (user ${JSON.stringify(holder.usename ?? '')}, application ${JSON.stringify(holder.application_name ?? '')}, ${String(holder.state)}, connected ${String(holder.connected)})`
  throw new MigrationError(
    `could not take the migration lock (advisory lock ${ADVISORY_LOCK_ID}) within ${timeoutMs} ms: ${who} holds it. ` +
    'Another deploy may be migrating; if that session is stuck, end it with SELECT pg_terminate_backend(<pid>)'
  )
}
