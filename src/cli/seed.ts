// npm run db:seed — seeds the demo companies once (a database with companies is left alone).
import { MigrationError, pendingMigrations } from '../db/migrate.ts'
import { DEMO_PASSWORD, seedIfEmpty } from '../../prisma/seed.ts'
import { runDatabaseScript } from './run.ts'

await runDatabaseScript(async (db, config) => {
  // Without the schema the seed's first query failed with Prisma's stack trace.
  const pending = await db.withSession(sql => pendingMigrations(sql))
  if (pending.length > 0) throw new MigrationError(`the database is missing ${pending.length} migration(s) (first: ${pending[0]}): run npm run db:migrate first`)
  if (!await seedIfEmpty(db.prisma)) return 'database already has data: nothing seeded'
  if (config.production) console.warn(`WARNING: NODE_ENV=production: the demo users now in this database have the published password (${DEMO_PASSWORD}). Change their passwords or remove them.`)
  return 'seeded demo data'
})
