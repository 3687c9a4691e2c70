import { spawn, type ChildProcess } from 'node:child_process'
import { access, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import t, { type Test } from 'tap'
import pg from 'pg'
import { DEMO_PASSWORD, DEMO_USERS } from '../prisma/seed.ts'
import { connect, nextEvent, TEST_POSTGRES_URL, uniqueName } from './helpers.ts'

const ROOT = fileURLToPath(new URL('..', import.meta.url))

interface Started {
  child: ChildProcess
  url: string
  banner: string
  output: () => string
  exited: Promise<{ code: number | null, signal: NodeJS.Signals | null, stderr: string }>
}

/** The environment of a clean start: no inherited database, Redis or secrets. */
function cleanEnv (extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env }
  for (const name of ['DATABASE_URL', 'REDIS_URL', 'JWT_SECRET', 'NODE_ENV', 'PORT', 'HOST', 'DATA_DIR', 'CORS_ORIGINS', 'REDIS_PREFIX']) delete env[name]
  // The child runs through tsx, whose transform differs from tap's: merging its coverage with
  // the in-process runs garbles the report, so only in-process code is measured.
  return { ...env, LOG_LEVEL: 'warn', _TAPJS_PROCESSINFO_COVERAGE_: '0', ...extra }
}

/** Spawns the real entry point the way `npm start` does (with `npm: true`, through npm itself, in a process group of its own). */
function run (env: Record<string, string>, { npm = false } = {}) {
  const child = npm
    ? spawn('npm', ['start', '--silent'], { cwd: ROOT, env: cleanEnv(env), stdio: ['ignore', 'pipe', 'pipe'], detached: true })
    : spawn(process.execPath, ['--import', 'tsx', 'src/server.ts'], { cwd: ROOT, env: cleanEnv(env), stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  child.stdout!.setEncoding('utf8').on('data', (chunk: string) => { stdout += chunk })
  child.stderr!.setEncoding('utf8').on('data', (chunk: string) => { stderr += chunk })
  const exited = new Promise<{ code: number | null, signal: NodeJS.Signals | null, stderr: string }>(resolve => {
    child.once('exit', (code, signal) => {
      // Let the pipes drain before reporting what the process printed.
      setImmediate(() => resolve({ code, signal, stderr }))
    })
  })
  return { child, exited, output: () => stdout, errors: () => stderr }
}

/** Starts the server and resolves once its banner printed the URL. Killed at teardown if still up. */
async function start (t: Test, env: Record<string, string>, options: { npm?: boolean } = {}): Promise<Started> {
  const proc = run({ PORT: '0', HOST: '127.0.0.1', ...env }, options)
  t.teardown(() => {
    // Through npm: the whole group (npm and the server it started).
    if (options.npm) {
      try { process.kill(-proc.child.pid!, 'SIGKILL') } catch {}
    } else if (proc.child.exitCode === null && proc.child.signalCode === null) proc.child.kill('SIGKILL')
  })
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no banner within 90 s:\n${proc.output()}\n${proc.errors()}`)), 90_000)
    const onData = () => {
      const match = /listening on (http:\/\/[\d.]+:\d+)/.exec(proc.output())
      if (!match) return
      clearTimeout(timer)
      proc.child.stdout!.off('data', onData)
      resolve(match[1]!)
    }
    proc.child.stdout!.on('data', onData)
    void proc.exited.then(({ code, stderr }) => {
      clearTimeout(timer)
      reject(new Error(`server exited with ${code} before listening:\n${stderr}`))
    })
  })
  // The banner is one console.log: wait for its last line.
  while (!proc.output().includes('/health/websocket')) await new Promise(resolve => setTimeout(resolve, 10))
  return { child: proc.child, url, banner: proc.output(), output: proc.output, exited: proc.exited }
}

async function login (url: string, email: string): Promise<string> {
  const res = await fetch(`${url}/auth/login`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ email, password: DEMO_PASSWORD }) })
  if (res.status !== 200) throw new Error(`login failed: ${res.status} ${await res.text()}`)
  return ((await res.json()) as { token: string }).token
}

// The three flows are independent child processes: run them side by side (a fresh PGlite's
// initdb alone takes several seconds).
t.jobs = 3

const counts = (banner: string) => {
  const match = /migrations applied: (\d+), already applied: (\d+)/.exec(banner)
  return match ? { applied: Number(match[1]), already: Number(match[2]) } : undefined
}

t.test('npm start on PGlite: migrate, seed, log in, connect, receive an event, shut down cleanly; a second start seeds nothing', { buffered: true }, async t => {
  const dataDir = await mkdtemp(path.join(tmpdir(), 'erp-start-'))
  t.teardown(() => rm(dataDir, { recursive: true, force: true }))

  const first = await start(t, { DATA_DIR: dataDir })
  t.match(first.banner, /embedded PGlite in .*pglite/, 'the banner names the embedded database')
  t.match(first.banner, /demo data seeded/)
  const firstCounts = counts(first.banner)
  t.ok(firstCounts && firstCounts.applied >= 1 && firstCounts.already === 0, `first start applies every migration (${JSON.stringify(firstCounts)})`)
  for (const user of DEMO_USERS) t.match(first.banner, user.email, `the banner lists ${user.email}`)
  t.match(first.banner, DEMO_PASSWORD, 'the banner says the password')
  t.match(first.banner, /io\('http:\/\/127\.0\.0\.1:\d+', \{ auth: \{ token \}/, 'the banner shows how to connect')

  const token = await login(first.url, 'admin@acme.test')
  const socket = await connect(t, first.url, token)
  const created = nextEvent(socket, 'project:created')
  const res = await fetch(`${first.url}/projects`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
    body: JSON.stringify({ name: 'Started from the real entry point' })
  })
  t.equal(res.status, 201)
  const envelope = await created
  t.match(envelope, { type: 'project:created', seq: 1, data: { project: { name: 'Started from the real entry point' } } })

  const health = await (await fetch(`${first.url}/health/websocket`)).json() as Record<string, any>
  t.match(health, { status: 'ok', connections: 1, eventLog: { backend: 'pglite' }, adapter: { type: 'memory' } })

  const shutdownNotice = nextEvent(socket, 'server:shutdown', 10_000).then(() => true, () => false)
  const disconnected = new Promise<string>(resolve => socket.once('disconnect', reason => resolve(reason)))
  first.child.kill('SIGTERM')
  const exit = await first.exited
  t.equal(exit.code, 0, `SIGTERM exits 0 (stderr: ${exit.stderr.trim().slice(0, 300)})`)
  t.type(await disconnected, 'string', 'the socket saw the disconnect')
  t.ok(await shutdownNotice, 'the socket was told before the connection closed')

  // Same data dir: nothing to migrate, nothing to seed, data kept.
  const second = await start(t, { DATA_DIR: dataDir })
  t.same(counts(second.banner), { applied: 0, already: firstCounts!.applied }, 'the second start applies 0 migrations')
  t.notMatch(second.banner, /demo data seeded/, 'the second start does not seed again')
  const again = await login(second.url, 'admin@acme.test')
  const projects = await (await fetch(`${second.url}/projects`, { headers: { authorization: `Bearer ${again}` } })).json() as { projects: Array<{ name: string }> }
  t.same(projects.projects.map(p => p.name).sort(), ['Harbour Bridge Refit', 'Riverside Offices', 'Started from the real entry point'], 'seeded once, and the new project survived the restart')
  second.child.kill('SIGINT')
  t.equal((await second.exited).code, 0, 'SIGINT exits 0 too')
})

t.test('bad configuration stops the start with one line naming the variable', { buffered: true }, async t => {
  const cases: Array<[string, Record<string, string>, string]> = [
    ['PORT=abc', { PORT: 'abc' }, 'PORT'],
    ['a short JWT_SECRET', { JWT_SECRET: 'short' }, 'JWT_SECRET'],
    ['production without JWT_SECRET', { NODE_ENV: 'production' }, 'JWT_SECRET'],
    ['a DATABASE_URL that is not PostgreSQL', { DATABASE_URL: 'mysql://localhost/db' }, 'DATABASE_URL']
  ]
  // In parallel: each one is a cold tsx start.
  const results = await Promise.all(cases.map(async ([, env]) => {
    const proc = run({ DATA_DIR: path.join(tmpdir(), uniqueName('never-created')), ...env })
    t.teardown(() => { if (proc.child.exitCode === null) proc.child.kill('SIGKILL') })
    return { ...(await proc.exited), stdout: proc.output() }
  }))
  for (const [i, [what, , variable]] of cases.entries()) {
    const { code, stderr, stdout } = results[i]!
    t.not(code, 0, `${what}: exits non-zero`)
    const lines = stderr.split('\n').map(l => l.trim()).filter(Boolean)
    t.equal(lines.length, 1, `${what}: one line (${JSON.stringify(lines)})`)
    t.match(lines[0], new RegExp(`^Invalid configuration: ${variable} `), `${what}: names ${variable}`)
    t.notMatch(stdout, /listening/, `${what}: never listened`)
  }
})

t.test('npm start with DATABASE_URL applies the migrations to PostgreSQL through the same runner', { buffered: true }, async t => {
  const name = uniqueName('erp_start')
  const admin = new pg.Client({ connectionString: TEST_POSTGRES_URL })
  await admin.connect()
  await admin.query(`CREATE DATABASE ${name}`)
  await admin.end()
  t.teardown(async () => {
    const cleanup = new pg.Client({ connectionString: TEST_POSTGRES_URL })
    await cleanup.connect()
    await cleanup.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
    await cleanup.end()
  })
  const url = new URL(TEST_POSTGRES_URL)
  url.pathname = `/${name}`
  const dataDir = path.join(tmpdir(), uniqueName('never-created'))

  const server = await start(t, { DATABASE_URL: url.toString(), DATA_DIR: dataDir, JWT_SECRET: 'a-production-like-secret-of-40-characters!' })
  t.match(server.banner, /PostgreSQL \(DATABASE_URL\)/)
  const applied = counts(server.banner)
  t.ok(applied && applied.applied >= 1 && applied.already === 0, `all migrations applied (${JSON.stringify(applied)})`)
  t.notMatch(server.output(), /WARNING: JWT_SECRET is not set/, 'no dev-secret warning when JWT_SECRET is set')
  const token = await login(server.url, 'manager@acme.test')
  const health = await (await fetch(`${server.url}/health/websocket`, { headers: { authorization: `Bearer ${token}` } })).json() as Record<string, any>
  t.match(health, { status: 'ok', eventLog: { backend: 'postgresql' }, database: { status: 'up' } })
  server.child.kill('SIGTERM')
  t.equal((await server.exited).code, 0)

  const client = new pg.Client({ connectionString: url.toString() })
  await client.connect()
  t.teardown(() => client.end())
  const { rows } = await client.query('SELECT migration_name, finished_at, applied_steps_count, rolled_back_at FROM "_prisma_migrations" ORDER BY migration_name')
  t.equal(rows.length, applied!.applied, 'one _prisma_migrations row per migration')
  t.ok(rows.every(r => r.finished_at !== null && r.applied_steps_count === 1 && r.rolled_back_at === null), 'each finished')
  t.equal(Number((await client.query('SELECT count(*) FROM companies')).rows[0].count), 2, 'seeded the two demo companies')

  // The embedded database was not touched when DATABASE_URL was set.
  await t.rejects(import('node:fs/promises').then(fs => fs.stat(dataDir)), 'no PGlite data dir was created')

  // A second start on the same PostgreSQL database: idempotent.
  const again = await start(t, { DATABASE_URL: url.toString(), DATA_DIR: dataDir, JWT_SECRET: 'a-production-like-secret-of-40-characters!' })
  t.same(counts(again.banner), { applied: 0, already: applied!.applied })
  t.notMatch(again.banner, /demo data seeded/)
  again.child.kill('SIGTERM')
  t.equal((await again.exited).code, 0)
})

// Regression (shutdown review): npm runs the script through `sh -c`, and Debian's sh (dash) stays
// a process of its own: a SIGTERM to npm alone (`docker stop` with `CMD npm start`, a supervisor)
// ended the shell and npm while the server kept running, with its port and the embedded
// database's lock. The script now `exec`s node, so the signal reaches the server.
t.test('npm start: a SIGTERM to the npm process alone shuts the server down', { buffered: true }, async t => {
  const dataDir = await mkdtemp(path.join(tmpdir(), 'erp-npm-start-'))
  t.teardown(() => rm(dataDir, { recursive: true, force: true }))
  const server = await start(t, { DATA_DIR: dataDir }, { npm: true })
  t.equal((await fetch(`${server.url}/health/live`)).status, 200)
  server.child.kill('SIGTERM')
  const exit = await server.exited
  t.equal(exit.code, 0, `npm exits 0 (stderr: ${exit.stderr.trim().slice(0, 300)})`)
  const lock = path.join(dataDir, 'pglite.lock')
  const gone = async () => !await access(lock).then(() => true, () => false) && await fetch(`${server.url}/health/live`).then(() => false, () => true)
  const deadline = Date.now() + 15_000
  while (!await gone() && Date.now() < deadline) await new Promise(resolve => setTimeout(resolve, 100))
  t.ok(await gone(), 'the server stopped: its port refuses and the lock is removed')
})

// Regression (shutdown review): a start that failed after opening the database (here: the port
// is taken) exited without closing it, leaving the embedded database's lock behind.
t.test('a start that fails after opening the embedded database closes it and removes its lock', { buffered: true }, async t => {
  const dataDir = await mkdtemp(path.join(tmpdir(), 'erp-failed-start-'))
  t.teardown(() => rm(dataDir, { recursive: true, force: true }))
  const { createServer } = await import('node:net')
  const taken = createServer()
  await new Promise<void>(resolve => taken.listen(0, '127.0.0.1', resolve))
  t.teardown(() => taken.close())
  const port = (taken.address() as { port: number }).port
  const proc = run({ PORT: String(port), HOST: '127.0.0.1', DATA_DIR: dataDir })
  t.teardown(() => { if (proc.child.exitCode === null) proc.child.kill('SIGKILL') })
  const exit = await proc.exited
  t.equal(exit.code, 1)
  t.match(exit.stderr, /erp-realtime failed to start: listen EADDRINUSE/)
  await t.rejects(access(path.join(dataDir, 'pglite.lock')), { code: 'ENOENT' }, 'the lock is removed')
})
