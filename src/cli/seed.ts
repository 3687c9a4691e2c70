// npm run db:seed — seeds the demo companies once (a database with companies is left alone).
import { DEMO_PASSWORD, seedIfEmpty } from '../db/seed.ts'
import { runDatabaseScript } from './run.ts'

await runDatabaseScript(async (db, config) => {
  if (!await seedIfEmpty(db.prisma)) return 'database already has data: nothing seeded'
  if (config.production) console.warn(`WARNING: NODE_ENV=production: the demo users now in this database have the published password (${DEMO_PASSWORD}). Change their passwords or remove them.`)
  return 'seeded demo data'
})
