// npm run db:migrate — applies prisma/migrations to DATABASE_URL (or the embedded database).
import path from 'node:path'
import { loadConfig } from '../config.ts'
import { openDatabase } from '../db/index.ts'
import { migrate } from '../db/migrate.ts'

const config = loadConfig()
const db = await openDatabase({ url: config.databaseUrl, dataDir: path.join(config.dataDir, 'pglite'), preparedStatements: config.preparedStatements })
try {
  const result = await db.withSession(sql => migrate(sql))
  console.log(`applied: ${result.applied.join(', ') || 'none'}; already applied: ${result.alreadyApplied.length}`)
} finally {
  await db.close()
}
