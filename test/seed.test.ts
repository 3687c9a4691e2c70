import { spawn } from 'node:child_process'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import t, { type Test } from 'tap'
import { loadConfig } from '../src/config.ts'
import { openDatabase, type PrismaClient } from '../src/db/index.ts'
import { demoLogins, seedIfEmpty, seedOnStart, DEMO_PASSWORD, DEMO_USERS } from '../prisma/seed.ts'
import { hashPassword } from '../src/passwords.ts'
import { build, testDatabase, TEST_JWT_SECRET, uniqueName } from './helpers.ts'

t.test('the demo seed runs once and its users can log in', async t => {
  const { app, prisma } = await build(t)
  t.equal(await seedIfEmpty(prisma), true)
  t.equal(await seedIfEmpty(prisma), false, 'a database with companies is left alone')
  t.equal(await prisma.company.count(), 2)
  t.equal(await prisma.user.count(), DEMO_USERS.length)
  for (const user of DEMO_USERS) {
    const res = await app.inject({ method: 'POST', url: '/auth/login', payload: { email: user.email, password: DEMO_PASSWORD } })
    t.equal(res.statusCode, 200, user.email)
    t.match(res.json(), { role: user.role, company: { name: user.company } })
  }
  // Seeded rows carry their first revision, so stale edits of them can be merged.
  t.equal(await prisma.revision.count({ where: { entity: 'project', version: 1 } }), 3)
})

// Regression (database review): "empty" meant "no company", so a database holding users but no
// company was seeded beside them (demo users with the published password), or failed on a demo
// email already taken.
t.test('a database with users but no company is not seeded', async t => {
  const { prisma } = await build(t)
  await prisma.user.create({ data: { email: DEMO_USERS[0].email, name: 'real person', passwordHash: await hashPassword('their own') } })
  t.equal(await seedIfEmpty(prisma), false)
  t.equal(await prisma.user.count(), 1, 'no demo user added')
  t.equal(await prisma.company.count(), 0)
})

/** Every seeded row counted, to check the demo data exists exactly once. */
async function seededCounts (prisma: PrismaClient) {
  return {
    companies: await prisma.company.count(),
    users: await prisma.user.count(),
    memberships: await prisma.membership.count(),
    projects: await prisma.project.count(),
    stockItems: await prisma.stockItem.count(),
    revisions: await prisma.revision.count()
  }
}
const ONCE = { companies: 2, users: DEMO_USERS.length, memberships: DEMO_USERS.length, projects: 3, stockItems: 3, revisions: 6 }
const NOTHING = { companies: 0, users: 0, memberships: 0, projects: 0, stockItems: 0, revisions: 0 }

// Regression: the emptiness check ran outside the seed transaction, so nodes starting together
// on a fresh database all passed it and all but one crashed with a unique violation on users.email.
t.test('nodes seeding one fresh PostgreSQL database at once all succeed, and the demo data exists once', async t => {
  const db = await testDatabase(t)
  const nodes = [db]
  for (let i = 0; i < 2; i++) {
    const other = await openDatabase({ url: db.url, poolSize: 2 })
    t.teardown(() => other.close())
    nodes.push(other)
  }
  const results = await Promise.allSettled(nodes.map(node => seedIfEmpty(node.prisma)))
  t.same(results.map(r => r.status), ['fulfilled', 'fulfilled', 'fulfilled'],
    `no node fails (${results.map(r => r.status === 'rejected' ? String((r.reason as Error).message).split('\n').at(-1) : 'ok').join(' | ')})`)
  t.same(results.map(r => r.status === 'fulfilled' && r.value).filter(Boolean).length, 1, 'exactly one seeded')
  t.same(await seededCounts(db.prisma), ONCE)
})

t.test('concurrent seeds on one embedded PGlite database seed once', async t => {
  const db = await testDatabase(t, { embedded: true })
  const results = await Promise.all([seedIfEmpty(db.prisma), seedIfEmpty(db.prisma)])
  t.same(results.slice().sort(), [false, true], 'one seeds, the other finds it done')
  t.same(await seededCounts(db.prisma), ONCE)
})

// Regression: `npm start` seeded the demo users (published password) into any empty database,
// production PostgreSQL included.
t.test('on start: production seeds nothing unless SEED_DEMO=1; development seeds unless SEED_DEMO=0', async t => {
  const production = { NODE_ENV: 'production', JWT_SECRET: TEST_JWT_SECRET }
  const cases: Array<[string, NodeJS.ProcessEnv, boolean]> = [
    ['NODE_ENV=production', production, false],
    ['NODE_ENV=production SEED_DEMO=0', { ...production, SEED_DEMO: '0' }, false],
    ['NODE_ENV=production SEED_DEMO=1', { ...production, SEED_DEMO: '1' }, true],
    ['development', {}, true],
    ['development SEED_DEMO=0', { SEED_DEMO: '0' }, false]
  ]
  for (const [what, env, seeds] of cases) {
    const db = await testDatabase(t)
    const result = await seedOnStart(db.prisma, loadConfig(env))
    t.equal(result.seeded, seeds, `${what}: ${seeds ? 'seeds' : 'does not seed'}`)
    t.same(await seededCounts(db.prisma), seeds ? ONCE : NOTHING, `${what}: ${seeds ? 'the demo data' : 'no demo data'}`)
    t.same(result.logins.map(u => u.email), seeds ? DEMO_USERS.map(u => u.email) : [], `${what}: demo logins listed only when they exist`)
  }
})

t.test('demo logins are those demo users that still have the published password', async t => {
  const db = await testDatabase(t, { embedded: true })
  t.same(await demoLogins(db.prisma), [], 'none before seeding')
  await seedIfEmpty(db.prisma)
  t.same(await demoLogins(db.prisma), DEMO_USERS)
  await db.prisma.user.update({ where: { email: 'admin@acme.test' }, data: { passwordHash: await hashPassword('a-changed-password') } })
  await db.prisma.user.delete({ where: { email: 'member@globex.test' } })
  t.same((await demoLogins(db.prisma)).map(u => u.email), ['manager@acme.test', 'member@acme.test', 'admin@globex.test'])
  const again = await seedOnStart(db.prisma, { seedDemo: true })
  t.equal(again.seeded, false, 'a database with companies is not seeded again')
  t.equal(again.logins.length, 3)
})

const ROOT = fileURLToPath(new URL('..', import.meta.url))

/** Runs the real entry point on `databaseUrl` until its banner, then stops it: the banner and stderr. */
async function startServer (t: Test, databaseUrl: string, extra: Record<string, string>) {
  const env: NodeJS.ProcessEnv = { ...process.env }
  for (const name of ['DATABASE_URL', 'REDIS_URL', 'JWT_SECRET', 'NODE_ENV', 'PORT', 'HOST', 'DATA_DIR', 'CORS_ORIGINS', 'REDIS_PREFIX', 'SEED_DEMO']) delete env[name]
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/server.ts'], {
    cwd: ROOT,
    env: {
      ...env,
      LOG_LEVEL: 'warn',
      _TAPJS_PROCESSINFO_COVERAGE_: '0',
      PORT: '0',
      HOST: '127.0.0.1',
      DATABASE_URL: databaseUrl,
      DATA_DIR: path.join(tmpdir(), uniqueName('never-created')),
      JWT_SECRET: TEST_JWT_SECRET,
      ...extra
    },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  t.teardown(() => { if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL') })
  let stdout = ''
  let stderr = ''
  child.stdout.setEncoding('utf8').on('data', (chunk: string) => { stdout += chunk })
  child.stderr.setEncoding('utf8').on('data', (chunk: string) => { stderr += chunk })
  const exited = new Promise<number | null>(resolve => child.once('exit', code => setImmediate(() => resolve(code))))
  const deadline = Date.now() + 60_000
  while (!stdout.includes('/health/websocket')) {
    if (child.exitCode !== null || Date.now() > deadline) throw new Error(`no banner:\n${stdout}\n${stderr}`)
    await new Promise(resolve => setTimeout(resolve, 20))
  }
  child.kill('SIGTERM')
  t.equal(await exited, 0, 'SIGTERM exits 0')
  return { banner: stdout, stderr }
}

t.test('npm start with NODE_ENV=production on a fresh PostgreSQL: no demo data and no demo logins printed, unless SEED_DEMO=1', { buffered: true }, async t => {
  const [plain, asked] = await Promise.all([testDatabase(t), testDatabase(t)])
  const [off, on] = await Promise.all([
    startServer(t, plain.url!, { NODE_ENV: 'production' }),
    startServer(t, asked.url!, { NODE_ENV: 'production', SEED_DEMO: '1' })
  ])

  t.same(await seededCounts(plain.prisma), NOTHING, 'production: nothing seeded')
  t.notMatch(off.banner, /demo data seeded/)
  t.notMatch(off.banner, DEMO_PASSWORD, 'the banner does not print the demo password')
  for (const user of DEMO_USERS) t.notMatch(off.banner, user.email, `nor ${user.email}`)
  t.match(off.banner, /no demo users; SEED_DEMO=1 seeds them/, 'it says how to get them')
  t.notMatch(off.stderr, /demo users/, 'no warning')

  t.same(await seededCounts(asked.prisma), ONCE, 'production with SEED_DEMO=1: seeded')
  t.match(on.banner, /demo data seeded/)
  for (const user of DEMO_USERS) t.match(on.banner, user.email, `the banner lists ${user.email}`)
  t.match(on.stderr, /WARNING: demo users with the published demo password exist in this production database/, 'and warns about them')
})
