import { createHash } from 'node:crypto'
import { cp, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import t, { type Test } from 'tap'
import type { Database } from '../src/db/index.ts'
import { checksumMatches, DEFAULT_MIGRATIONS_DIR, migrate, MigrationError, pendingMigrations, type SqlRunner } from '../src/db/migrate.ts'
import { emptyTestDatabase, testDatabase } from './helpers.ts'

/** A fresh PostgreSQL database with nothing in it (not migrated), dropped at teardown. */
const emptyDatabase = (t: Test) => emptyTestDatabase(t, { poolSize: 3, prefix: 'erp_migrate' })

/** A copy of the real migrations folder that a test may add to and edit. */
async function migrationsCopy (t: Test): Promise<string> {
  const dir = await mkdtemp(path.join(tmpdir(), 'erp-migrations-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  await cp(DEFAULT_MIGRATIONS_DIR, dir, { recursive: true })
  return dir
}

async function addMigration (dir: string, name: string, script: string) {
  await mkdir(path.join(dir, name), { recursive: true })
  await writeFile(path.join(dir, name, 'migration.sql'), script)
}

const sha256 = (text: string) => createHash('sha256').update(text).digest('hex')

async function migrationNames (dir: string) {
  return (await readdir(dir, { withFileTypes: true })).filter(e => e.isDirectory()).map(e => e.name).sort()
}

const rows = (db: Database) => db.withSession(sql => sql.query(
  'SELECT id, checksum, finished_at, migration_name, logs, rolled_back_at, started_at, applied_steps_count FROM "_prisma_migrations" ORDER BY started_at, migration_name'
))

t.test('applies every migration once, recorded the way prisma migrate deploy records them', async t => {
  const db = await emptyDatabase(t)
  const names = await migrationNames(DEFAULT_MIGRATIONS_DIR)
  t.ok(names.length >= 1, 'the project has migrations')

  const first = await db.withSession(sql => migrate(sql))
  t.same(first, { applied: names, alreadyApplied: [] })

  // The bookkeeping table has exactly Prisma's columns and types.
  const columns = await db.withSession(sql => sql.query(`
    SELECT column_name, data_type, character_maximum_length, is_nullable
    FROM information_schema.columns WHERE table_name = '_prisma_migrations' ORDER BY ordinal_position`))
  t.same(columns.map(c => [c.column_name, c.data_type, c.character_maximum_length, c.is_nullable]), [
    ['id', 'character varying', 36, 'NO'],
    ['checksum', 'character varying', 64, 'NO'],
    ['finished_at', 'timestamp with time zone', null, 'YES'],
    ['migration_name', 'character varying', 255, 'NO'],
    ['logs', 'text', null, 'YES'],
    ['rolled_back_at', 'timestamp with time zone', null, 'YES'],
    ['started_at', 'timestamp with time zone', null, 'NO'],
    ['applied_steps_count', 'integer', null, 'NO']
  ])

  const recorded = await rows(db)
  t.equal(recorded.length, names.length)
  for (const [i, name] of names.entries()) {
    const row = recorded[i]!
    const script = await readFile(path.join(DEFAULT_MIGRATIONS_DIR, name, 'migration.sql'), 'utf8')
    t.equal(row.migration_name, name)
    t.equal(row.checksum, sha256(script), `${name}: checksum is the SHA-256 hex of migration.sql`)
    t.match(row.id, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/, `${name}: id is a UUID`)
    t.type(row.finished_at, Date, `${name}: finished_at set`)
    t.ok((row.finished_at as Date) >= (row.started_at as Date), `${name}: finished after it started`)
    t.equal(row.applied_steps_count, 1)
    t.equal(row.logs, null)
    t.equal(row.rolled_back_at, null)
  }

  // The schema is really there.
  const tables = await db.withSession(sql => sql.query(`SELECT tablename FROM pg_tables WHERE schemaname = 'public'`))
  for (const table of ['companies', 'users', 'memberships', 'projects', 'expenses', 'stock_items', 'stock_movements', 'events', 'stream_heads']) {
    t.ok(tables.some(r => r.tablename === table), `table ${table} exists`)
  }
  t.equal(await db.prisma.company.count(), 0, 'the Prisma client works on the migrated schema')
})

t.test('re-running is idempotent', async t => {
  const db = await emptyDatabase(t)
  const names = await migrationNames(DEFAULT_MIGRATIONS_DIR)
  await db.withSession(sql => migrate(sql))
  const before = await rows(db)
  const again = await db.withSession(sql => migrate(sql))
  t.same(again, { applied: [], alreadyApplied: names })
  t.same(await rows(db), before, 'no row added or changed')
})

t.test('concurrent runners exclude each other through the advisory lock', async t => {
  const db = await emptyDatabase(t)
  const names = await migrationNames(DEFAULT_MIGRATIONS_DIR)
  const [a, b] = await Promise.all([db.withSession(sql => migrate(sql)), db.withSession(sql => migrate(sql))])
  t.same([...a.applied, ...b.applied].sort(), names, 'each migration applied by exactly one runner')
  t.same([...a.alreadyApplied, ...b.alreadyApplied].sort(), names, 'and seen as done by the other')
  t.equal((await rows(db)).length, names.length)
})

t.test('only new migrations apply, in name order; files beside the folders are ignored', async t => {
  const db = await emptyDatabase(t)
  const dir = await migrationsCopy(t)
  const base = await migrationNames(dir)
  await db.withSession(sql => migrate(sql, dir))

  await addMigration(dir, '29990102000000_second', 'ALTER TABLE projects ADD COLUMN "code2" TEXT;\n')
  await addMigration(dir, '29990101000000_first', 'ALTER TABLE projects ADD COLUMN "code1" TEXT;\n')
  await writeFile(path.join(dir, 'README.txt'), 'not a migration')
  const result = await db.withSession(sql => migrate(sql, dir))
  t.same(result, { applied: ['29990101000000_first', '29990102000000_second'], alreadyApplied: base })
  const columns = await db.withSession(sql => sql.query(`SELECT column_name FROM information_schema.columns WHERE table_name = 'projects' AND column_name LIKE 'code%' ORDER BY 1`))
  t.same(columns.map(c => c.column_name), ['code1', 'code2'])
})

t.test('a migration edited after it was applied is detected (checksum mismatch) and nothing runs', async t => {
  const db = await emptyDatabase(t)
  const dir = await migrationsCopy(t)
  await addMigration(dir, '29990101000000_add_code', 'ALTER TABLE projects ADD COLUMN "code" TEXT;\n')
  await db.withSession(sql => migrate(sql, dir))

  await writeFile(path.join(dir, '29990101000000_add_code', 'migration.sql'), 'ALTER TABLE projects ADD COLUMN "code" VARCHAR(10);\n')
  await addMigration(dir, '29990102000000_later', 'CREATE TABLE later_table (id INT);\n')
  const err = await db.withSession(sql => migrate(sql, dir)).catch((e: unknown) => e)
  t.type(err, MigrationError)
  t.equal((err as MigrationError).migration, '29990101000000_add_code')
  t.match((err as Error).message, /edited after it was applied \(checksum mismatch\)/)
  const later = await db.withSession(sql => sql.query(`SELECT to_regclass('later_table') AS t`))
  t.equal(later[0]!.t, null, 'the migration after it did not run')

  // The lock was released: the restored file migrates again.
  await writeFile(path.join(dir, '29990101000000_add_code', 'migration.sql'), 'ALTER TABLE projects ADD COLUMN "code" TEXT;\n')
  t.same((await db.withSession(sql => migrate(sql, dir))).applied, ['29990102000000_later'])
})

t.test('pendingMigrations names what migrate would apply, creating nothing', async t => {
  const db = await emptyDatabase(t)
  const dir = await migrationsCopy(t)
  const base = await migrationNames(dir)
  t.same(await db.withSession(sql => pendingMigrations(sql, dir)), base, 'a database never migrated: every one')
  const table = await db.withSession(sql => sql.query(`SELECT to_regclass('"public"."_prisma_migrations"') AS t`))
  t.equal(table[0]!.t, null, 'no bookkeeping table was created')
  await db.withSession(sql => migrate(sql, dir))
  t.same(await db.withSession(sql => pendingMigrations(sql, dir)), [], 'none once migrated')
  await addMigration(dir, '29990101000000_next', 'SELECT 1;\n')
  t.same(await db.withSession(sql => pendingMigrations(sql, dir)), ['29990101000000_next'])
  // A failed attempt is not applied.
  await addMigration(dir, '29990102000000_broken', 'SELECT no_such_column FROM projects;\n')
  await db.withSession(sql => migrate(sql, dir)).catch(() => {})
  t.same(await db.withSession(sql => pendingMigrations(sql, dir)), ['29990102000000_broken'])
})

t.test('a failed migration is rolled back, recorded with its logs, and refuses the next run until resolved', async t => {
  const db = await emptyDatabase(t)
  const dir = await migrationsCopy(t)
  await db.withSession(sql => migrate(sql, dir))
  const broken = 'CREATE TABLE half_done (id INT);\nSELECT no_such_column FROM projects;\n'
  await addMigration(dir, '29990101000000_broken', broken)

  const err = await db.withSession(sql => migrate(sql, dir)).catch((e: unknown) => e)
  t.type(err, MigrationError)
  t.equal((err as MigrationError).migration, '29990101000000_broken')
  t.match((err as Error).message, /migration 29990101000000_broken failed: .*no_such_column/)

  const row = (await rows(db)).find(r => r.migration_name === '29990101000000_broken')!
  t.ok(row, 'the attempt is recorded')
  t.equal(row.finished_at, null, 'not finished')
  t.equal(row.applied_steps_count, 0)
  t.match(row.logs, /no_such_column/, 'logs hold the database error')
  t.equal(row.checksum, sha256(broken))
  const halfDone = await db.withSession(sql => sql.query(`SELECT to_regclass('half_done') AS t`))
  t.equal(halfDone[0]!.t, null, 'its first statement was rolled back with it')

  // Fixing the file is not enough: the failed row must be resolved first (as with Prisma).
  await writeFile(path.join(dir, '29990101000000_broken', 'migration.sql'), 'CREATE TABLE half_done (id INT);\n')
  const refused = await db.withSession(sql => migrate(sql, dir)).catch((e: unknown) => e)
  t.type(refused, MigrationError)
  t.match((refused as Error).message, /29990101000000_broken failed earlier and was not resolved/)
  const plain = await emptyDatabase(t)
  t.ok(await plain.withSession(sql => migrate(sql, dir)), 'another database is not affected')

  // Resolved the way `prisma migrate resolve --rolled-back` does it.
  await db.withSession(sql => sql.query(`UPDATE "_prisma_migrations" SET rolled_back_at = now() WHERE migration_name = $1`, ['29990101000000_broken']))
  const retried = await db.withSession(sql => migrate(sql, dir))
  t.same(retried.applied, ['29990101000000_broken'])
  const final = (await rows(db)).filter(r => r.migration_name === '29990101000000_broken')
  t.equal(final.length, 2, 'the rolled-back attempt stays in the history')
  t.ok(final.some(r => r.finished_at !== null && r.rolled_back_at === null))
})

/** Holds the migration lock in a session of its own until `release()`. */
async function holdMigrationLock (db: Database) {
  let release!: () => void
  const released = new Promise<void>(resolve => { release = resolve })
  let locked!: () => void
  const taken = new Promise<void>(resolve => { locked = resolve })
  const session = db.withSession(async sql => {
    await sql.query('SELECT pg_advisory_lock(72707369)')
    locked()
    await released
    await sql.query('SELECT pg_advisory_unlock(72707369)')
  })
  await taken
  return { release: async () => { release(); await session } }
}

// Regression: the runner blocked in pg_advisory_lock, so a session left holding the lock (a
// migration stuck or killed without its connection closing) hung every later start for good.
t.test('a migration lock held past lockTimeoutMs fails the run with the holder named, and migrates nothing', async t => {
  const db = await emptyDatabase(t)
  const holder = await holdMigrationLock(db)
  t.teardown(holder.release)
  const started = Date.now()
  const err = await db.withSession(sql => migrate(sql, DEFAULT_MIGRATIONS_DIR, { lockTimeoutMs: 300 })).catch((e: unknown) => e)
  t.ok(Date.now() - started >= 300, 'waited the timeout out')
  t.type(err, MigrationError)
  t.match((err as Error).message, /could not take the migration lock \(advisory lock 72707369\) within 300 ms: session pid \d+ \(user "postgres", application "[^"]*", [a-z ]+, connected \d+ s\) holds it/)
  const tables = await db.withSession(sql => sql.query("SELECT count(*)::int AS n FROM information_schema.tables WHERE table_name = '_prisma_migrations'"))
  t.equal(tables[0]!.n, 0, 'nothing was created')
  await holder.release()
  t.same((await db.withSession(sql => migrate(sql))).alreadyApplied, [], 'once the lock is free the run goes through')
})

t.test('a runner waiting for the lock takes it as soon as the holder lets go', async t => {
  const db = await emptyDatabase(t)
  const holder = await holdMigrationLock(db)
  const run = db.withSession(sql => migrate(sql, DEFAULT_MIGRATIONS_DIR, { lockTimeoutMs: 30_000 }))
  await new Promise(resolve => setTimeout(resolve, 250))
  await holder.release()
  t.same((await run).applied, await migrationNames(DEFAULT_MIGRATIONS_DIR))
})

t.test('lockTimeoutMs is validated', async t => {
  const db = await emptyDatabase(t)
  for (const lockTimeoutMs of [-1, 1.5, Number.NaN, Infinity]) {
    await t.rejects(db.withSession(sql => migrate(sql, DEFAULT_MIGRATIONS_DIR, { lockTimeoutMs })), /lockTimeoutMs must be a whole number of ms ≥ 0/)
  }
  t.same((await db.withSession(sql => migrate(sql, DEFAULT_MIGRATIONS_DIR, { lockTimeoutMs: 0 }))).alreadyApplied, [], 'a free lock is taken at once with 0')
})

t.test('the lock is released after a failure, so another session can migrate', async t => {
  const db = await emptyDatabase(t)
  const dir = await migrationsCopy(t)
  await addMigration(dir, '29990101000000_broken', 'SELECT 1/0;\n')
  await t.rejects(db.withSession(sql => migrate(sql, dir)), MigrationError)
  // A runner whose session never got the lock back would hang here.
  const lock = await db.withSession(sql => sql.query('SELECT pg_try_advisory_lock(72707369) AS ok'))
  t.equal(lock[0]!.ok, true, 'the advisory lock is free')
  await db.withSession(sql => sql.query('SELECT pg_advisory_unlock(72707369)'))
})

t.test('the runner works over any SqlRunner (the embedded database uses the same code)', async t => {
  const db = await emptyDatabase(t)
  const statements: string[] = []
  const result = await db.withSession(sql => {
    const spy: SqlRunner = {
      exec: async (script) => { statements.push(script.split('\n')[0]!); await sql.exec(script) },
      query: async (text, params) => { statements.push(text.split('\n')[0]!); return await sql.query(text, params) }
    }
    return migrate(spy)
  })
  t.ok(result.applied.length >= 1)
  t.match(statements[0], /pg_try_advisory_lock/, 'takes the lock first')
  t.match(statements.at(-1), /pg_advisory_unlock/, 'releases it last')
  t.equal(statements[1], 'SET search_path TO "public"', 'tables go to public')
  t.equal(statements.at(-2), 'RESET search_path')
  t.notOk(statements.includes('BEGIN'), 'each script is one query (its own implicit transaction), as prisma migrate deploy sends it')
})

// Regression: the runner sent `BEGIN;\n<script>\nCOMMIT;` as one string, so a valid migration
// whose last statement has no semicolon failed with `syntax error at or near "COMMIT"` (which
// `prisma migrate deploy` applies), was recorded as failed and blocked every later run.
for (const embedded of [false, true]) {
  t.test(`a migration whose last statement has no trailing semicolon applies (${embedded ? 'PGlite' : 'PostgreSQL'})`, async t => {
    const db = await testDatabase(t, { embedded })
    const dir = await migrationsCopy(t)
    const base = await migrationNames(dir)
    const script = 'CREATE TABLE no_semicolon (id INT);\nALTER TABLE no_semicolon ADD COLUMN code TEXT'
    await addMigration(dir, '29990101000000_no_semicolon', script)
    // Comment-only scripts (Prisma writes `-- This is an empty migration.`) and a trailing line comment.
    await addMigration(dir, '29990102000000_empty', '-- This is an empty migration.')
    await addMigration(dir, '29990103000000_comment', 'ALTER TABLE no_semicolon ADD COLUMN note TEXT -- trailing comment')

    const result = await db.withSession(sql => migrate(sql, dir))
    t.same(result, { applied: ['29990101000000_no_semicolon', '29990102000000_empty', '29990103000000_comment'], alreadyApplied: base })
    const columns = await db.withSession(sql => sql.query(`SELECT column_name FROM information_schema.columns WHERE table_name = 'no_semicolon' ORDER BY ordinal_position`))
    t.same(columns.map(c => c.column_name), ['id', 'code', 'note'])
    const row = (await rows(db)).find(r => r.migration_name === '29990101000000_no_semicolon')!
    t.match(row, { checksum: sha256(script), applied_steps_count: 1, logs: null, rolled_back_at: null }, 'recorded as finished, checksum of the file as is')
    t.type(row.finished_at, Date)

    // And the next run goes on: nothing was left failed.
    await addMigration(dir, '29990104000000_later', 'CREATE TABLE later_table (id INT);\n')
    t.same((await db.withSession(sql => migrate(sql, dir))).applied, ['29990104000000_later'])
    const open = await db.withSession(sql => sql.query('SELECT count(*)::int AS n FROM pg_locks WHERE locktype = \'advisory\' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())'))
    t.equal(open[0]!.n, 0, 'no advisory lock left behind')
  })
}

t.test('a failing migration rolls back completely: its statements share one implicit transaction (PGlite)', async t => {
  const db = await testDatabase(t, { embedded: true })
  const dir = await migrationsCopy(t)
  await addMigration(dir, '29990101000000_broken', 'CREATE TABLE half_done (id INT);\nSELECT 1/0')
  await t.rejects(db.withSession(sql => migrate(sql, dir)), { name: 'MigrationError', message: /division by zero/ })
  const halfDone = await db.withSession(sql => sql.query(`SELECT to_regclass('half_done') AS t`))
  t.equal(halfDone[0]!.t, null, 'its first statement was rolled back')
  const state = await db.withSession(sql => sql.query('SELECT count(*)::int AS n FROM projects'))
  t.equal(state[0]!.n, 0, 'the session is usable again (not left in an aborted transaction)')
  t.equal(await db.prisma.company.count(), 0, 'and so is Prisma on the same embedded database')
})

// Regression (database review): the runner wrapped each script in BEGIN/COMMIT, so a migration of
// its own holding CREATE INDEX CONCURRENTLY (as Prisma's docs advise) failed with "cannot run
// inside a transaction block", was recorded as failed and blocked every later run; prisma
// migrate deploy sends the script as one query and applies it.
t.test('a migration holding only CREATE INDEX CONCURRENTLY applies (PostgreSQL)', async t => {
  const db = await emptyDatabase(t)
  const dir = await migrationsCopy(t)
  await addMigration(dir, '29990101000000_concurrent_index', 'CREATE INDEX CONCURRENTLY "projects_name_idx" ON "projects"("name");\n')
  t.same((await db.withSession(sql => migrate(sql, dir))).applied.at(-1), '29990101000000_concurrent_index')
  const [index] = await db.withSession(sql => sql.query(`SELECT indisvalid FROM pg_index WHERE indexrelid = 'projects_name_idx'::regclass`))
  t.equal(index!.indisvalid, true)
})

// Regression (database review): with a schema named like the role ("$user" comes first on the
// default search_path) every table went there, and the app's queries, which name "public",
// found none.
t.test('tables go to the public schema even when the search_path puts another schema first (PostgreSQL)', async t => {
  const db = await emptyDatabase(t)
  await db.withSession(sql => sql.exec('CREATE SCHEMA postgres')) // the test role's name
  await db.withSession(sql => migrate(sql))
  const [where] = await db.withSession(sql => sql.query(`SELECT table_schema FROM information_schema.tables WHERE table_name = 'users'`))
  t.equal(where!.table_schema, 'public')
  t.equal(await db.prisma.company.count(), 0, 'the app finds its tables')
})

// Regression (database review): settings a migration made for its session reached the app's
// queries: the migration's connection went back to the pool (PGlite: it is the app's session).
for (const embedded of [false, true]) {
  t.test(`a migration's session settings do not outlive it (${embedded ? 'PGlite' : 'PostgreSQL'})`, async t => {
    const db = await testDatabase(t, { embedded })
    const dir = await migrationsCopy(t)
    await addMigration(dir, '29990101000000_session_setting', 'SET session_replication_role = replica;\nCREATE TABLE after_setting (id INT);\n')
    await db.withSession(sql => migrate(sql, dir))
    for (let i = 0; i < 3; i++) {
      const [setting] = await db.prisma.$queryRaw<Array<{ session_replication_role: string }>>`SHOW session_replication_role`
      t.equal(setting!.session_replication_role, 'origin', 'foreign keys are enforced again for the app')
    }
  })
}

// Regression (database review): a checkout that turned LF into CRLF (no .gitattributes), or a
// checksum older Prisma versions wrote (unpadded hex), stopped every start with "was edited after
// it was applied", where Prisma accepts both.
t.test('checksums match across line endings and older Prisma formats; an edited script still does not', async t => {
  const script = 'CREATE TABLE a (id INT);\nCREATE TABLE b (id INT);\n'
  const digest = createHash('sha256').update(script).digest()
  t.ok(checksumMatches(digest.toString('hex'), script))
  t.ok(checksumMatches(digest.toString('hex'), script.replace(/\n/g, '\r\n')), 'CRLF checkout of an LF-recorded script')
  t.ok(checksumMatches(createHash('sha256').update(script.replace(/\n/g, '\r\n')).digest('hex'), script), 'LF checkout of a CRLF-recorded script')
  const unpadded = [...digest].map(byte => byte.toString(16)).join('')
  t.ok(unpadded.length < 64 || digest.every(byte => byte >= 16), 'the fixture has a byte below 0x10')
  t.ok(checksumMatches(unpadded, script), 'unpadded hex')
  t.notOk(checksumMatches(digest.toString('hex'), script.replace('b (id INT)', 'b (id BIGINT)')), 'an edit')

  const db = await emptyDatabase(t)
  const dir = await migrationsCopy(t)
  await db.withSession(sql => migrate(sql, dir))
  for (const name of await migrationNames(dir)) {
    const file = path.join(dir, name, 'migration.sql')
    await writeFile(file, (await readFile(file, 'utf8')).replace(/\n/g, '\r\n'))
  }
  const again = await db.withSession(sql => migrate(sql, dir))
  t.same(again.applied, [], 'nothing re-applied, nothing refused after a CRLF checkout')
})

// Regression (review): a script with its own BEGIN that failed left the session in an aborted
// transaction (the runner no longer sent ROLLBACK): the original error and its logs were lost to
// "current transaction is aborted", and on PGlite the app's one session stayed unusable.
for (const embedded of [false, true]) {
  t.test(`a failing migration with its own BEGIN is reported with its error, and the session stays usable (${embedded ? 'PGlite' : 'PostgreSQL'})`, async t => {
    const db = await testDatabase(t, { embedded })
    const dir = await migrationsCopy(t)
    await db.withSession(sql => migrate(sql, dir))
    await addMigration(dir, '29990101000000_own_transaction', 'BEGIN;\nCREATE TABLE own_tx (id INT);\nSELECT 1/0;\nCOMMIT;\n')
    await t.rejects(db.withSession(sql => migrate(sql, dir)), { name: 'MigrationError', message: /29990101000000_own_transaction failed: division by zero/ })
    const row = (await rows(db)).find(r => r.migration_name === '29990101000000_own_transaction')!
    t.match(row.logs, /division by zero/, 'its logs hold the error')
    t.equal(await db.prisma.company.count(), 0, 'the app can query again')
  })
}

// Regression (review): a migration that changed the search_path (pg_dump's
// set_config('search_path', '', false)) broke the runner's own unqualified bookkeeping: the
// script committed but was never marked finished, and the next run refused.
t.test('a migration that empties the search_path is still recorded as finished, and the next one still lands in public', async t => {
  const db = await emptyDatabase(t)
  const dir = await migrationsCopy(t)
  await addMigration(dir, '29990101000000_dump_style', `SELECT pg_catalog.set_config('search_path', '', false);\nCREATE TABLE public.dumped (id INT);\n`)
  await addMigration(dir, '29990102000000_after', 'CREATE TABLE after_dump (id INT);\n')
  const result = await db.withSession(sql => migrate(sql, dir))
  t.same(result.applied.slice(-2), ['29990101000000_dump_style', '29990102000000_after'])
  const [where] = await db.withSession(sql => sql.query(`SELECT table_schema FROM information_schema.tables WHERE table_name = 'after_dump'`))
  t.equal(where!.table_schema, 'public')
  t.same((await db.withSession(sql => migrate(sql, dir))).applied, [], 'nothing pending or failed')
})

// Regression (database review): the runner checked each applied migration's checksum as it came
// to it, so a pending migration named before an edited one (an out-of-order merge) was applied
// before the edit was found.
t.test('an edited migration stops the run before any pending migration named before it applies', async t => {
  const db = await emptyDatabase(t)
  const dir = await migrationsCopy(t)
  await addMigration(dir, '29990102000000_b', 'CREATE TABLE b_table (id INT);\n')
  await db.withSession(sql => migrate(sql, dir))
  await addMigration(dir, '29990101000000_a', 'CREATE TABLE a_table (id INT);\n')
  await writeFile(path.join(dir, '29990102000000_b', 'migration.sql'), 'CREATE TABLE b_table (id BIGINT);\n')
  const err = await db.withSession(sql => migrate(sql, dir)).catch((e: unknown) => e)
  t.type(err, MigrationError)
  t.equal((err as MigrationError).migration, '29990102000000_b')
  const a = await db.withSession(sql => sql.query(`SELECT to_regclass('a_table') AS t`))
  t.equal(a[0]!.t, null, 'the pending migration did not run')
})

// Regression (database review): a script that ended with `BEGIN` open was reported applied while
// its transaction was still open: closing the connection then rolled back the script and its
// bookkeeping, and on PGlite the app's one session stayed inside that transaction.
for (const embedded of [false, true]) {
  t.test(`a migration that leaves a transaction open fails, applies nothing, and the session is usable (${embedded ? 'PGlite' : 'PostgreSQL'})`, async t => {
    const db = await testDatabase(t, { embedded })
    const dir = await migrationsCopy(t)
    await addMigration(dir, '29990101000000_open_tx', 'BEGIN;\nCREATE TABLE left_open (id INT);\n')
    const err = await db.withSession(sql => migrate(sql, dir)).catch((e: unknown) => e)
    t.type(err, MigrationError)
    t.match((err as Error).message, /migration 29990101000000_open_tx failed: the script left a transaction open/)
    const [table] = await db.prisma.$queryRaw<Array<{ t: string | null }>>`SELECT to_regclass('left_open')::text AS t`
    t.equal(table!.t, null, 'nothing of it applied')
    const [row] = await db.prisma.$queryRaw<Array<{ finished_at: Date | null, logs: string | null }>>`SELECT finished_at, logs FROM "_prisma_migrations" WHERE migration_name = '29990101000000_open_tx'`
    t.equal(row!.finished_at, null)
    t.match(row!.logs, /left a transaction open/)
    t.equal(await db.withSession(async sql => sql.inTransaction?.()), false, 'the session is not left in a transaction')
    t.equal(await db.prisma.project.count(), 0, 'and it answers')
  })
}

// Regression (database review): after a script that ran `SET ROLE`, the bookkeeping ran as that
// role: the applied script was left recorded as unfinished (permission denied on
// _prisma_migrations), and the next run refused it as "failed earlier".
t.test('a migration that switches role is recorded as finished, and the next ones run as the runner (PostgreSQL)', async t => {
  const db = await emptyDatabase(t)
  const dir = await migrationsCopy(t)
  const role = `erp_migrate_role_${process.pid}_${Date.now().toString(36)}`
  const database = await db.withSession(sql => sql.query('SELECT current_database() AS name'))
  const dropRole = () => db.withSession(async sql => {
    await sql.exec(`REASSIGN OWNED BY ${role} TO CURRENT_USER; DROP OWNED BY ${role}; DROP ROLE ${role}`)
  }).catch(() => {})
  await db.withSession(sql => sql.exec(`CREATE ROLE ${role}; GRANT USAGE, CREATE ON SCHEMA public TO ${role}; GRANT CONNECT ON DATABASE ${String(database[0]!.name)} TO ${role}`))
  t.teardown(dropRole)
  await addMigration(dir, '29990101000000_as_role', `SET ROLE ${role};\nCREATE TABLE owned_by_role (id INT);\n`)
  await addMigration(dir, '29990102000000_after', 'CREATE TABLE after_role (id INT);\n')
  const result = await db.withSession(sql => migrate(sql, dir))
  t.same(result.applied.slice(-2), ['29990101000000_as_role', '29990102000000_after'])
  const owners = await db.withSession(sql => sql.query(`SELECT tablename, tableowner FROM pg_tables WHERE tablename IN ('owned_by_role', 'after_role') ORDER BY tablename`))
  t.same(owners.map(o => [o.tablename, o.tableowner === role]), [['after_role', false], ['owned_by_role', true]])
  t.same((await db.withSession(sql => migrate(sql, dir))).applied, [], 'the next run finds both applied')
  await dropRole()
})

// Regression (review): a migration folder without its migration.sql stopped the runner with a raw
// ENOENT (the database scripts then said they could not reach the database).
t.test('a migration folder without migration.sql is refused by name, before anything applies', async t => {
  const db = await emptyDatabase(t)
  const dir = await migrationsCopy(t)
  await mkdir(path.join(dir, '29990101000000_no_script'))
  const err = await db.withSession(sql => migrate(sql, dir)).catch((e: unknown) => e)
  t.type(err, MigrationError)
  t.equal((err as Error).message, 'migration 29990101000000_no_script has no migration.sql')
  const table = await db.withSession(sql => sql.query(`SELECT to_regclass('"public"."projects"') AS t`))
  t.equal(table[0]!.t, null, 'nothing applied')
})
