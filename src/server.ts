import path from 'node:path'
import { buildApp } from './app.ts'
import { ConfigError, databaseOptions, loadConfig } from './config.ts'
import { openDatabase } from './db/index.ts'
import { migrate } from './db/migrate.ts'
import { DEMO_PASSWORD, seedOnStart } from '../prisma/seed.ts'

async function main () {
  let config
  try {
    config = loadConfig()
  } catch (err) {
    if (err instanceof ConfigError) {
      console.error(err.message)
      process.exit(1)
    }
    throw err
  }
  if (config.jwtSecretIsDefault) {
    console.warn('WARNING: JWT_SECRET is not set; using a development-only secret. Anyone can forge tokens. Set JWT_SECRET (32+ characters) outside development.')
  }

  const dataDir = path.join(config.dataDir, 'pglite')
  const db = await openDatabase(databaseOptions(config))
  // A start that fails from here on closes what it opened: the embedded database's lock was
  // left behind (with PGlite not closed cleanly) when migrating, seeding or listening failed.
  let app: Awaited<ReturnType<typeof buildApp>> | undefined
  const closeOnFailure = async (err: unknown) => {
    await app?.close().catch(() => {})
    await db.close().catch(() => {})
    throw err
  }
  const migrations = await db.withSession(sql => migrate(sql, undefined, { lockTimeoutMs: config.migrationLockTimeoutMs })).catch(closeOnFailure)
  // Demo data only where SEED_DEMO allows it (default: not in production); the banner lists the
  // demo logins only when they exist and still have the published password.
  const { seeded, logins } = await seedOnStart(db.prisma, config).catch(closeOnFailure)
  if (config.production && logins.length > 0) {
    console.warn(`WARNING: demo users with the published demo password exist in this production database: ${logins.map(u => u.email).join(', ')}. Change their passwords or remove them.`)
  }

  app = await buildApp({ config, db, logger: { level: config.logLevel } }).catch(closeOnFailure)
  let closing = false
  const shutdown = async (signal: string) => {
    if (closing) {
      console.error(`${signal} again: exiting now`)
      process.exit(1)
    }
    closing = true
    app.log.info({ signal }, 'shutting down: telling sockets, closing HTTP and the database')
    const force = setTimeout(() => {
      console.error('shutdown took longer than 10 s: exiting')
      process.exit(1)
    }, 10_000)
    force.unref()
    try {
      await app.close()
      await db.close()
      process.exit(0)
    } catch (err) {
      console.error('shutdown failed', err)
      process.exit(1)
    }
  }
  process.on('SIGINT', () => void shutdown('SIGINT'))
  process.on('SIGTERM', () => void shutdown('SIGTERM'))

  await app.listen({ port: config.port, host: config.host }).catch(closeOnFailure)
  const address = app.server.address()
  const port = typeof address === 'object' && address ? address.port : config.port
  const base = `http://${config.host}:${port}`
  console.log([
    '',
    `erp-realtime listening on ${base} (HTTP + Socket.IO on the same port)`,
    `  database: ${db.kind === 'pglite' ? `embedded PGlite in ${dataDir}` : 'PostgreSQL (DATABASE_URL)'}; migrations applied: ${migrations.applied.length}, already applied: ${migrations.alreadyApplied.length}${seeded ? '; demo data seeded' : ''}`,
    `  adapter: ${config.redisUrl ? 'Redis (REDIS_URL)' : 'in-memory (single node)'}`,
    ...(logins.length > 0
      ? [
          '  log in:',
          `    curl -s -X POST ${base}/auth/login -H 'content-type: application/json' -d '{"email":"${logins[0]!.email}","password":"${DEMO_PASSWORD}"}'`,
          `    demo users (password "${DEMO_PASSWORD}"): ${logins.map(u => `${u.email} (${u.role})`).join(', ')}`
        ]
      : [`  log in: POST ${base}/auth/login {"email","password"} (no demo users${config.seedDemo ? '' : '; SEED_DEMO=1 seeds them into an empty database'})`]),
    '  connect a client:',
    `    io('${base}', { auth: { token }, transports: ['websocket'] })`,
    `  health: ${base}/health/websocket`,
    ''
  ].join('\n'))
}

main().catch((err) => {
  console.error('erp-realtime failed to start:', err instanceof Error ? err.message : err)
  process.exit(1)
})
