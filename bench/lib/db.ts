import { randomBytes } from 'node:crypto'
import pg from 'pg'
import { migrate } from '../../src/db/migrate.ts'
import { hashPassword } from '../../src/passwords.ts'
import type { Role } from '../../plugins/events.ts'

/** PostgreSQL server the bench creates its databases on (trust auth on loopback). */
export const BENCH_POSTGRES_URL = process.env.BENCH_DATABASE_URL ?? 'postgresql://postgres@127.0.0.1:5432/postgres'

export interface BenchDatabase {
  name: string
  url: string
  drop (): Promise<void>
}

export interface SeededCompany {
  companyId: string
  /** users[0] is the admin; the rest are members. */
  users: Array<{ id: string, role: Role }>
}

const withClient = async <T>(url: string, fn: (client: pg.Client) => Promise<T>): Promise<T> => {
  const client = new pg.Client({ connectionString: url })
  await client.connect()
  try {
    return await fn(client)
  } finally {
    await client.end()
  }
}

const urlFor = (name: string) => {
  const url = new URL(BENCH_POSTGRES_URL)
  url.pathname = `/${name}`
  return url.toString()
}

/** Creates and migrates a fresh database `erp_bench_<random>`; `drop()` removes it. */
export async function createBenchDatabase (): Promise<BenchDatabase> {
  const name = `erp_bench_${Date.now().toString(36)}_${randomBytes(3).toString('hex')}`
  await withClient(BENCH_POSTGRES_URL, c => c.query(`CREATE DATABASE ${name}`))
  const url = urlFor(name)
  let dropped = false
  const drop = async () => {
    if (dropped) return
    dropped = true
    await withClient(BENCH_POSTGRES_URL, c => c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`))
  }
  try {
    await withClient(url, c => migrate({
      exec: async (script) => { await c.query(script) },
      query: async (text, params) => (await c.query(text, params as unknown[])).rows
    }))
  } catch (err) {
    await drop().catch(() => {})
    throw err
  }
  return { name, url, drop }
}

let hash: Promise<string> | undefined
export const BENCH_PASSWORD = 'bench-password'

/** One company with `users` users (one admin, the rest members). */
export async function seedCompany (db: BenchDatabase, users: number): Promise<SeededCompany> {
  return (await seedCompanies(db, 1, users))[0]!
}

/**
 * `count` companies of `usersPerCompany` users each (the first of each is the admin), in three
 * set-based statements: seeding 10,000 one-user companies one by one would take minutes. The
 * password is hashed once and shared (the KDF is deliberately slow).
 */
export async function seedCompanies (db: BenchDatabase, count: number, usersPerCompany: number): Promise<SeededCompany[]> {
  hash ??= hashPassword(BENCH_PASSWORD)
  const passwordHash = await hash
  const tag = randomBytes(8).toString('hex')
  return await withClient(db.url, async (c) => {
    await c.query('BEGIN')
    const { rows: companies } = await c.query<{ id: string, n: number }>(
      `INSERT INTO companies (id, name)
       SELECT gen_random_uuid()::text, 'Bench Co ' || $1 || ' ' || g FROM generate_series(1, $2::int) AS g
       RETURNING id, (regexp_match(name, ' (\\d+)$'))[1]::int AS n`, [tag, count])
    companies.sort((a, b) => a.n - b.n)
    const { rows: users } = await c.query<{ id: string, n: number }>(
      `INSERT INTO users (id, email, name, "passwordHash")
       SELECT gen_random_uuid()::text, 'bench' || g || '.' || $2 || '@bench.test', 'Bench user ' || g, $1
       FROM generate_series(0, $3::int - 1) AS g
       RETURNING id, (regexp_match(email, '^bench(\\d+)\\.'))[1]::int AS n`, [passwordHash, tag, count * usersPerCompany])
    users.sort((a, b) => a.n - b.n)
    await c.query(
      `INSERT INTO memberships ("userId", "companyId", role)
       SELECT u, c, (CASE WHEN (i - 1) % $3::int = 0 THEN 'admin' ELSE 'member' END)::"Role"
       FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(u, c, i)`,
      [users.map(u => u.id), users.map((_, i) => companies[Math.floor(i / usersPerCompany)]!.id), usersPerCompany])
    await c.query('COMMIT')
    return companies.map((company, k) => ({
      companyId: company.id,
      users: users.slice(k * usersPerCompany, (k + 1) * usersPerCompany).map((u, i) => ({ id: u.id, role: (i === 0 ? 'admin' : 'member') as Role }))
    }))
  })
}
