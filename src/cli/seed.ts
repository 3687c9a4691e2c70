// npm run db:seed — seeds the demo companies once (a database with companies is left alone).
import { seedIfEmpty } from '../db/seed.ts'
import { runDatabaseScript } from './run.ts'

await runDatabaseScript(async db => await seedIfEmpty(db.prisma) ? 'seeded demo data' : 'database already has data: nothing seeded')
