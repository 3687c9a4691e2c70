import { databaseUnreachable } from '../../plugins/support.ts'
import { type AppConfig, ConfigError, databaseOptions, loadConfig } from '../config.ts'
import { type Database, DatabaseInUseError, openDatabase } from '../db/index.ts'
import { MigrationError } from '../db/migrate.ts'

/**
 * Runs a database script (`npm run db:migrate`, `db:seed`): the database settings of the
 * environment, no JWT_SECRET needed (a release step may not have the app's secret); a bad
 * variable, a refused migration, an embedded database in use (`npm start` running on it) or a
 * database that cannot be reached prints one line and exits 1.
 */
export async function runDatabaseScript (fn: (db: Database, config: AppConfig) => Promise<string>): Promise<void> {
  let db: Database | undefined
  try {
    const config = loadConfig(process.env, { requireSecret: false })
    db = await openDatabase(databaseOptions(config))
    console.log(await fn(db, config))
  } catch (err) {
    if (err instanceof ConfigError || err instanceof MigrationError || err instanceof DatabaseInUseError) {
      console.error(err.message)
    } else if (databaseUnreachable(err)) {
      // One line, not pg's stack trace.
      console.error(`could not reach the database: ${(err as Error).message}`)
    } else {
      throw err
    }
    process.exitCode = 1
  } finally {
    await db?.close()
  }
}
