import { execFile } from 'node:child_process'
import { createServer, type Socket } from 'node:net'
import { mkdir, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import pg from 'pg'
import t from 'tap'
import { emptyTestDatabase, uniqueName } from './helpers.ts'

const ROOT = fileURLToPath(new URL('..', import.meta.url))

/** Runs a database script the way `npm run db:*` does, with a clean environment plus `env`. */
function script (name: 'migrate' | 'seed', env: Record<string, string>) {
  const clean: NodeJS.ProcessEnv = { ...process.env }
  for (const variable of ['DATABASE_URL', 'REDIS_URL', 'JWT_SECRET', 'NODE_ENV', 'DATA_DIR', 'SEED_DEMO']) delete clean[variable]
  // The child runs through tsx, whose coverage would not merge with tap's (see startup.test.ts).
  const childEnv = { ...clean, _TAPJS_PROCESSINFO_COVERAGE_: '0', DATA_DIR: path.join(tmpdir(), uniqueName('never-created')), ...env }
  return new Promise<{ code: number | null, stdout: string, stderr: string }>(resolve => {
    execFile(process.execPath, ['--import', 'tsx', `src/cli/${name}.ts`], { cwd: ROOT, env: childEnv, timeout: 60_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : null) : 0, stdout, stderr })
    })
  })
}

// Regression: the scripts read the whole app configuration, so in production they refused to run
// without the app's JWT_SECRET (a key they never use) and died with a stack trace.
t.test('db:migrate and db:seed run in production without JWT_SECRET, with the database settings of the environment', async t => {
  const db = await emptyTestDatabase(t, { prefix: 'erp_cli' })
  const env = { NODE_ENV: 'production', DATABASE_URL: db.url }
  const migrated = await script('migrate', env)
  t.equal(migrated.code, 0, migrated.stderr)
  t.match(migrated.stdout, /^applied: \d{14}_\w+(, \d{14}_\w+)*; already applied: 0\n$/)
  const again = await script('migrate', env)
  t.match(again.stdout, /^applied: none; already applied: [1-9]\d*\n$/, 'a second run applies nothing')
  const seeded = await script('seed', env)
  t.equal(seeded.stdout, 'seeded demo data\n')
  t.match(seeded.stderr, /^WARNING: NODE_ENV=production: the demo users now in this database have the published password/, 'warned, as npm start warns')
  t.equal((await script('seed', env)).stdout, 'database already has data: nothing seeded\n')
})

// Regression: db:seed on a database never migrated died with Prisma's stack trace ("The table
// `public.companies` does not exist"), on a fresh DATA_DIR as on an empty PostgreSQL database.
t.test('db:seed on a database that is not migrated prints one line saying to migrate first and exits 1', async t => {
  const db = await emptyTestDatabase(t, { prefix: 'erp_cli' })
  const dataDir = path.join(tmpdir(), uniqueName('pglite-fresh'))
  t.teardown(() => rm(dataDir, { recursive: true, force: true }))
  for (const [where, env] of [['PostgreSQL', { DATABASE_URL: db.url }], ['embedded', { DATA_DIR: dataDir }]] as const) {
    const result = await script('seed', env)
    t.equal(result.code, 1, `${where}: exit code 1`)
    t.match(result.stderr, /^the database is missing \d+ migration\(s\) \(first: \d{14}_\w+\): run npm run db:migrate first\n$/, `${where}: one line`)
    t.equal(result.stdout, '')
    t.equal((await script('migrate', env)).code, 0)
    t.equal((await script('seed', env)).stdout, 'seeded demo data\n', `${where}: seeds once migrated`)
  }
})

// Regression (database review): a database that could not be reached ended the script with
// pg's stack trace.
t.test('a database script whose database cannot be reached prints one line and exits 1', async t => {
  const closed = await new Promise<number>(resolve => {
    const server = createServer().listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number }
      server.close(() => resolve(port))
    })
  })
  for (const name of ['migrate', 'seed'] as const) {
    const result = await script(name, { DATABASE_URL: `postgresql://postgres@127.0.0.1:${closed}/nothing`, DATABASE_CONNECT_TIMEOUT_MS: '2000' })
    t.equal(result.code, 1, `${name}: exit code 1`)
    t.equal(result.stderr, `could not reach the database: connect ECONNREFUSED 127.0.0.1:${closed}\n`, `${name}: one line`)
  }
  // A server that accepts and never answers: pg-pool's connect timeout, one line too.
  const accepted: Socket[] = []
  const silent = createServer(socket => { accepted.push(socket) })
  await new Promise<void>(resolve => silent.listen(0, '127.0.0.1', resolve))
  t.teardown(() => {
    for (const socket of accepted) socket.destroy()
    silent.close()
  })
  const { port } = silent.address() as { port: number }
  const hung = await script('migrate', { DATABASE_URL: `postgresql://postgres@127.0.0.1:${port}/nothing`, DATABASE_CONNECT_TIMEOUT_MS: '300' })
  t.equal(hung.code, 1)
  t.match(hung.stderr, /^could not reach the database: [^\n]*timeout[^\n]*\n$/i)
  // A unix socket path with no server behind it (connect ENOENT).
  const noSocket = await script('migrate', { DATABASE_URL: `postgresql://postgres@localhost/nothing?host=${path.join(tmpdir(), uniqueName('no-socket-dir'))}` })
  t.equal(noSocket.code, 1)
  t.match(noSocket.stderr, /^could not reach the database: connect ENOENT [^\n]*\n$/)
})

t.test('a bad variable stops a database script with one line naming it and exit code 1', async t => {
  for (const [name, env, variable] of [
    ['migrate', { DATABASE_URL: 'mysql://localhost/db' }, 'DATABASE_URL'],
    ['seed', { DATABASE_CONNECT_TIMEOUT_MS: 'soon' }, 'DATABASE_CONNECT_TIMEOUT_MS']
  ] as const) {
    const result = await script(name, env)
    t.equal(result.code, 1, `${name}: exit code 1`)
    t.match(result.stderr, new RegExp(`^Invalid configuration: ${variable} [^\\n]*\\n$`), `${name}: one line naming ${variable}`)
    t.equal(result.stdout, '')
  }
})

t.test('db:migrate waits DATABASE_MIGRATION_LOCK_TIMEOUT_MS for a held migration lock, then prints one line naming the holder and exits 1', async t => {
  const db = await emptyTestDatabase(t, { prefix: 'erp_cli' })
  const holder = new pg.Client({ connectionString: db.url, application_name: 'stuck-deploy' })
  await holder.connect()
  t.teardown(() => holder.end())
  await holder.query('SELECT pg_advisory_lock(72707369)')
  const result = await script('migrate', { DATABASE_URL: db.url, DATABASE_MIGRATION_LOCK_TIMEOUT_MS: '300' })
  t.equal(result.code, 1)
  t.match(result.stderr, /^could not take the migration lock \(advisory lock 72707369\) within 300 ms: session pid \d+ \(user "postgres", application "stuck-deploy", idle, connected \d+ s\) holds it[^\n]*\n$/)
  await holder.query('SELECT pg_advisory_unlock(72707369)')
  t.equal((await script('migrate', { DATABASE_URL: db.url })).code, 0, 'runs once the lock is free')
})

// The embedded database is locked to one process (PGlite has no lock of its own): a script run
// while `npm start` holds it stops with one line instead of writing beside it.
t.test('db:seed on an embedded database another process has open prints one line and exits 1', async t => {
  const dataDir = path.join(tmpdir(), uniqueName('pglite-in-use'))
  await mkdir(dataDir, { recursive: true })
  t.teardown(() => rm(dataDir, { recursive: true, force: true }))
  await writeFile(path.join(dataDir, 'pglite.lock'), String(process.pid)) // this test process: alive
  const result = await script('seed', { DATA_DIR: dataDir })
  t.equal(result.code, 1, result.stderr)
  t.equal(result.stderr, `the embedded database in ${path.join(dataDir, 'pglite')} is in use by process ${process.pid}: stop it first (or give each its own DATA_DIR)\n`)
})
