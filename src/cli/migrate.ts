// npm run db:migrate — applies prisma/migrations to DATABASE_URL (or the embedded database).
import { migrate } from '../db/migrate.ts'
import { runDatabaseScript } from './run.ts'

await runDatabaseScript(async (db, config) => {
  const result = await db.withSession(sql => migrate(sql, undefined, { lockTimeoutMs: config.migrationLockTimeoutMs }))
  return `applied: ${result.applied.join(', ') || 'none'}; already applied: ${result.alreadyApplied.length}`
})
