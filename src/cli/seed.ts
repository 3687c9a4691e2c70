// npm run db:seed — seeds the demo companies once (a database with companies is left alone).
import path from 'node:path'
import { loadConfig } from '../config.ts'
import { openDatabase } from '../db/index.ts'
import { seedIfEmpty } from '../db/seed.ts'

const config = loadConfig()
const db = await openDatabase({ url: config.databaseUrl, dataDir: path.join(config.dataDir, 'pglite'), preparedStatements: config.preparedStatements })
try {
  console.log(await seedIfEmpty(db.prisma) ? 'seeded demo data' : 'database already has data: nothing seeded')
} finally {
  await db.close()
}
