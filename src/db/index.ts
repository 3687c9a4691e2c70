import { mkdir } from 'node:fs/promises'
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

/** Opens PostgreSQL through @prisma/adapter-pg, or embedded PGlite when no URL is given. */
export async function openDatabase (options: DatabaseOptions = {}): Promise<Database> {
  if (options.url) {
    const pool = new pg.Pool({ connectionString: options.url, max: options.poolSize ?? 10 })
    // An idle client's error (server restart) must not crash the process; the next query fails instead.
    pool.on('error', () => {})
    const preparedStatements = options.preparedStatements ?? 200
    const prisma = new PrismaClient({ adapter: new PrismaPg(pool, preparedStatements > 0 ? { statementNameGenerator: statementNames(preparedStatements) } : {}) })
    let closed = false
    return {
      kind: 'postgresql',
      prisma,
      async withSession (fn) {
        const client = await pool.connect()
        try {
          return await fn({
            exec: async (script) => { await client.query(script) },
            query: async (text, params) => (await client.query(text, params as unknown[])).rows
          })
        } finally {
          client.release()
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
  if (!dataDir.startsWith('memory://')) await mkdir(path.resolve(dataDir), { recursive: true })
  const pglite = await PGlite.create(dataDir)
  const prisma = new PrismaClient({ adapter: new PrismaPGlite(pglite) })
  let closed = false
  return {
    kind: 'pglite',
    prisma,
    withSession: (fn) => fn({
      exec: async (script) => { await pglite.exec(script) },
      query: async (text, params) => (await pglite.query(text, params as unknown[])).rows as Record<string, unknown>[]
    }),
    async close () {
      if (closed) return
      closed = true
      await prisma.$disconnect()
      await pglite.close()
    }
  }
}
