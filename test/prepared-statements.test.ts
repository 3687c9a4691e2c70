import t from 'tap'
import pg from 'pg'
import { openDatabase, statementNames, type Database } from '../src/db/index.ts'
import { emptyTestDatabase, type TestLike } from './helpers.ts'

t.test('statementNames: one name per SQL text, none past the cap', async t => {
  const name = statementNames(2)
  const first = name({ sql: 'SELECT 1' })
  t.equal(first, 'erp_0')
  t.equal(name({ sql: 'SELECT 2' }), 'erp_1')
  t.equal(name({ sql: 'SELECT 1' }), first, 'the same text keeps its name')
  t.equal(name({ sql: 'SELECT 3' }), '', 'past the cap a text goes unnamed')
  t.equal(name({ sql: 'SELECT 3' }), '', 'and stays unnamed')
  t.equal(name({ sql: 'SELECT 2' }), 'erp_1', 'named texts keep their names past the cap')
  t.equal(statementNames(0)({ sql: 'SELECT 1' }), '', 'a cap of 0 names nothing')
})

interface Prepared { name: string, statement: string, plans: number }

/** A Database on `url` with one connection, so every query sees the same session's statements. */
async function open (t: TestLike, url: string, preparedStatements?: number): Promise<Database> {
  const db = await openDatabase({ url, poolSize: 1, preparedStatements })
  t.teardown(() => db.close())
  return db
}

/** The session's prepared statements and how often each ran (PostgreSQL 14+ counts plans). */
const prepared = async (db: Database): Promise<Prepared[]> =>
  (await db.prisma.$queryRaw<Array<{ name: string, statement: string, plans: bigint }>>`
    SELECT name, statement, generic_plans + custom_plans AS plans FROM pg_prepared_statements ORDER BY name`)
    .map(row => ({ name: row.name, statement: row.statement, plans: Number(row.plans) }))

t.test('PostgreSQL: Prisma queries are prepared once per connection and then reused', async t => {
  const { url } = await emptyTestDatabase(t, { prefix: 'erp_prepared' })
  const db = await open(t, url)
  for (let i = 0; i < 3; i++) t.same(await db.prisma.$queryRaw`SELECT ${i}::int AS n`, [{ n: i }])
  const statements = await prepared(db)
  const select = statements.find(s => s.statement.includes('SELECT $1::int AS n'))
  t.ok(select, 'the query is a prepared statement of the session')
  t.match(select!.name, /^erp_\d+$/)
  t.equal(select!.plans, 3, 'prepared once, run three times')
})

t.test('PostgreSQL: past preparedStatements, queries run unnamed', async t => {
  const { url } = await emptyTestDatabase(t, { prefix: 'erp_prepared' })
  const db = await open(t, url, 1)
  t.same(await db.prisma.$queryRaw`SELECT 1::int AS one`, [{ one: 1 }])
  t.same(await db.prisma.$queryRaw`SELECT 2::int AS two`, [{ two: 2 }])
  const statements = await prepared(db)
  t.same(statements.map(s => s.name), ['erp_0'], 'only the first text got a name')
  t.match(statements[0]!.statement, /SELECT 1::int AS one/)
})

t.test('PostgreSQL: preparedStatements 0 prepares nothing (PgBouncer transaction mode)', async t => {
  const { url } = await emptyTestDatabase(t, { prefix: 'erp_prepared' })
  const db = await open(t, url, 0)
  t.same(await db.prisma.$queryRaw`SELECT 1::int AS one`, [{ one: 1 }])
  t.same(await prepared(db), [])
})

t.test('PostgreSQL: a statement first prepared in a transaction that rolled back, or refused in an aborted one, runs later', async t => {
  const { url } = await emptyTestDatabase(t, { prefix: 'erp_prepared' })
  const db = await open(t, url)
  const rolledBack = new Error('roll back')
  await t.rejects(db.prisma.$transaction(async (tx) => {
    t.same(await tx.$queryRaw`SELECT ${1}::int AS first`, [{ first: 1 }])
    throw rolledBack
  }), rolledBack)
  t.same(await db.prisma.$queryRaw`SELECT ${2}::int AS first`, [{ first: 2 }], 'prepared in the rolled-back transaction, still there')

  // In an aborted transaction PostgreSQL refuses the Parse itself: pg must not count it as prepared.
  await t.rejects(db.prisma.$transaction(async (tx) => {
    await tx.$queryRaw`SELECT 1 / ${0}::int AS boom`.catch(() => {})
    await tx.$queryRaw`SELECT ${3}::int AS second`
  }))
  t.same(await db.prisma.$queryRaw`SELECT ${4}::int AS second`, [{ second: 4 }], 'the refused statement is prepared on its next use')
})

// Regression (database review): a failed query outside a transaction makes the pool drop its
// connection, but an interactive transaction releases its connection without an error after
// ROLLBACK; so once a migration changed a column's type, every later transaction on a connection
// that had the statement prepared failed the same way, for as long as the connection lived.
t.test('PostgreSQL: after a column changes type, a statement prepared before fails once per connection, also inside transactions', async t => {
  const { url } = await emptyTestDatabase(t, { prefix: 'erp_prepared' })
  const db = await open(t, url)
  // Schema changes from another session, as a migration run by another process (the pool's one
  // connection keeps its prepared statements).
  const migrator = new pg.Client({ connectionString: url })
  await migrator.connect()
  t.teardown(() => migrator.end())
  await migrator.query('CREATE TABLE items (id int PRIMARY KEY, quantity int NOT NULL); INSERT INTO items VALUES (1, 5)')
  const read = () => db.prisma.$transaction(async (tx) => await tx.$queryRaw<Array<{ quantity: unknown }>>`SELECT quantity FROM items WHERE id = ${1}`)
  t.same(await read(), [{ quantity: 5 }], 'prepared on the connection')

  // The result type changes: 'cached plan must not change result type'.
  await migrator.query('ALTER TABLE items ALTER COLUMN quantity TYPE bigint')
  await t.rejects(read(), /cached plan must not change result type/, 'the first use after the change fails')
  for (let i = 0; i < 3; i++) t.same(await read(), [{ quantity: 5n }], `then it runs again (${i + 1})`)

  // A parameter's type changes: its type was fixed when the statement was prepared.
  await migrator.query('ALTER TABLE items ALTER COLUMN id TYPE text')
  await t.rejects(read(), /operator does not exist: text = integer/, 'the first use after the change fails')
  for (let i = 0; i < 3; i++) t.same(await read(), [{ quantity: 5n }], `then it runs again, prepared for a text id (${i + 1})`)
})
