import t from 'tap'
import { ConfigError, DEV_JWT_SECRET, loadConfig } from '../src/config.ts'

const SECRET = 'a'.repeat(32)

/** The ConfigError loadConfig throws for `env`. */
function failure (env: NodeJS.ProcessEnv): ConfigError {
  try {
    loadConfig(env)
  } catch (err) {
    if (err instanceof ConfigError) return err
    throw err
  }
  throw new Error(`expected ${JSON.stringify(env)} to be refused`)
}

t.test('defaults: an empty environment is a working development setup', async t => {
  const config = loadConfig({})
  t.match(config, {
    port: 3000,
    host: '127.0.0.1',
    databaseUrl: undefined,
    preparedStatements: undefined,
    databaseConnectTimeoutMs: undefined,
    databaseQueryTimeoutMs: undefined,
    migrationLockTimeoutMs: undefined,
    dataDir: '.data',
    redisUrl: undefined,
    jwtSecret: DEV_JWT_SECRET,
    jwtSecretIsDefault: true,
    corsOrigins: [],
    eventLogTtlSeconds: 86400,
    eventLogMaxLen: 10000,
    presenceGraceMs: 5000,
    production: false,
    logLevel: 'info',
    seedDemo: true
  })
  t.ok(DEV_JWT_SECRET.length >= 32, 'the dev secret is itself a valid HS256 key')
  t.same(loadConfig({ PORT: '', DATABASE_URL: '', JWT_SECRET: '', LOG_LEVEL: '', SEED_DEMO: '' }), config, 'empty variables count as unset')
})

t.test('every variable is read', async t => {
  const config = loadConfig({
    PORT: ' 8080 ',
    HOST: '0.0.0.0',
    DATABASE_URL: 'postgresql://erp:pw@db.internal:5432/erp',
    DATABASE_PREPARED_STATEMENTS: '0',
    DATABASE_CONNECT_TIMEOUT_MS: '2500',
    DATABASE_QUERY_TIMEOUT_MS: '0',
    DATABASE_MIGRATION_LOCK_TIMEOUT_MS: '60000',
    DATA_DIR: '/var/lib/erp',
    REDIS_URL: 'rediss://:pw@cache.internal:6380/2',
    JWT_SECRET: SECRET,
    CORS_ORIGINS: 'https://app.example.com, http://localhost:5173,,',
    EVENT_LOG_TTL_SECONDS: '3600',
    EVENT_LOG_MAXLEN: '500',
    PRESENCE_GRACE_MS: '0',
    LOGIN_ATTEMPTS_PER_MINUTE: '20',
    TRUST_PROXY: '1',
    LOG_LEVEL: 'debug',
    SEED_DEMO: '1',
    NODE_ENV: 'production'
  })
  t.match(config, {
    port: 8080,
    host: '0.0.0.0',
    databaseUrl: 'postgresql://erp:pw@db.internal:5432/erp',
    preparedStatements: 0,
    databaseConnectTimeoutMs: 2500,
    databaseQueryTimeoutMs: 0,
    migrationLockTimeoutMs: 60000,
    dataDir: '/var/lib/erp',
    redisUrl: 'rediss://:pw@cache.internal:6380/2',
    jwtSecret: SECRET,
    jwtSecretIsDefault: false,
    corsOrigins: ['https://app.example.com', 'http://localhost:5173'],
    eventLogTtlSeconds: 3600,
    eventLogMaxLen: 500,
    presenceGraceMs: 0,
    loginAttemptsPerMinute: 20,
    trustProxy: 1,
    production: true,
    logLevel: 'debug',
    seedDemo: true
  })
  t.equal(loadConfig({ DATABASE_URL: 'postgres://localhost/erp' }).databaseUrl, 'postgres://localhost/erp', 'postgres:// works too')
  t.equal(loadConfig({ DATABASE_URL: 'postgres://localhost/erp?schema=public' }).databaseUrl, 'postgres://localhost/erp?schema=public', '?schema=public is the schema used anyway')
  t.equal(loadConfig({ REDIS_URL: 'redis://127.0.0.1:6379' }).redisUrl, 'redis://127.0.0.1:6379')
  t.equal(loadConfig({ PORT: '0' }).port, 0, 'port 0 picks a free port')
  t.equal(loadConfig({ PORT: '65535' }).port, 65535)
  for (const level of ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']) {
    t.equal(loadConfig({ LOG_LEVEL: level }).logLevel, level, `LOG_LEVEL=${level}`)
  }
  t.equal(loadConfig({ LOG_LEVEL: ' WARN ' }).logLevel, 'warn', 'LOG_LEVEL ignores case and spaces')
})

t.test('each bad variable is refused with one line naming it', async t => {
  const cases: Array<[string, NodeJS.ProcessEnv, RegExp]> = [
    ['PORT', { PORT: 'abc' }, /whole number/],
    ['PORT', { PORT: '-1' }, /whole number/],
    ['PORT', { PORT: '3000.5' }, /whole number/],
    ['PORT', { PORT: '70000' }, /at most 65535/],
    ['HOST', { HOST: '   ' }, /empty/],
    ['DATABASE_URL', { DATABASE_URL: 'mysql://localhost/erp' }, /postgres:\/\/ or postgresql:\/\//],
    ['DATABASE_URL', { DATABASE_URL: 'not a url' }, /URL/],
    // Regression (database review): Prisma's ?schema= was accepted and ignored (pg does not read it).
    ['DATABASE_URL', { DATABASE_URL: 'postgresql://localhost/erp?schema=tenant1' }, /must not name a schema other than public/],
    ['DATABASE_PREPARED_STATEMENTS', { DATABASE_PREPARED_STATEMENTS: 'off' }, /whole number/],
    ['DATABASE_PREPARED_STATEMENTS', { DATABASE_PREPARED_STATEMENTS: '10001' }, /at most 10000/],
    ['DATABASE_CONNECT_TIMEOUT_MS', { DATABASE_CONNECT_TIMEOUT_MS: '5s' }, /whole number/],
    ['DATABASE_CONNECT_TIMEOUT_MS', { DATABASE_CONNECT_TIMEOUT_MS: '600001' }, /at most 600000/],
    ['DATABASE_QUERY_TIMEOUT_MS', { DATABASE_QUERY_TIMEOUT_MS: '-1' }, /whole number/],
    ['DATABASE_MIGRATION_LOCK_TIMEOUT_MS', { DATABASE_MIGRATION_LOCK_TIMEOUT_MS: '10s' }, /whole number/],
    ['DATABASE_QUERY_TIMEOUT_MS', { DATABASE_QUERY_TIMEOUT_MS: '3600001' }, /at most 3600000/],
    ['DATA_DIR', { DATA_DIR: '  ' }, /empty/],
    ['REDIS_URL', { REDIS_URL: 'http://localhost:6379' }, /redis:\/\/ or rediss:\/\//],
    ['REDIS_URL', { REDIS_URL: 'localhost:6379' }, /URL/],
    ['JWT_SECRET', { JWT_SECRET: 'short' }, /at least 32/],
    ['JWT_SECRET', { NODE_ENV: 'production' }, /must be set to your own secret when NODE_ENV=production/],
    // Regression: the development secret set explicitly was accepted in production.
    ['JWT_SECRET', { NODE_ENV: 'production', JWT_SECRET: DEV_JWT_SECRET }, /must be set to your own secret/],
    // Regression (security review): outside NODE_ENV=production, a server listening on every
    // interface signed tokens with the published development secret.
    ['JWT_SECRET', { HOST: '0.0.0.0' }, /must be set to your own secret when HOST \(0\.0\.0\.0\) is not a loopback address/],
    ['JWT_SECRET', { HOST: '10.0.0.5', NODE_ENV: 'prod' }, /not a loopback address/],
    ['CORS_ORIGINS', { CORS_ORIGINS: '*' }, /exact origins/],
    ['CORS_ORIGINS', { CORS_ORIGINS: 'https://app.example.com/' }, /exact origins/],
    ['CORS_ORIGINS', { CORS_ORIGINS: 'https://ok.example.com,ftp://files.example.com' }, /exact origins/],
    ['EVENT_LOG_TTL_SECONDS', { EVENT_LOG_TTL_SECONDS: '0' }, /at least 1/],
    ['EVENT_LOG_TTL_SECONDS', { EVENT_LOG_TTL_SECONDS: '1d' }, /whole number/],
    ['EVENT_LOG_MAXLEN', { EVENT_LOG_MAXLEN: '0' }, /at least 1/],
    ['EVENT_LOG_MAXLEN', { EVENT_LOG_MAXLEN: '99999999999' }, /at most/],
    ['PRESENCE_GRACE_MS', { PRESENCE_GRACE_MS: 'soon' }, /whole number/],
    ['LOGIN_ATTEMPTS_PER_MINUTE', { LOGIN_ATTEMPTS_PER_MINUTE: '-1' }, /whole number/],
    ['TRUST_PROXY', { TRUST_PROXY: 'yes please' }, /true, false, a number of proxy hops, or comma-separated proxy addresses/],
    ['TRUST_PROXY', { TRUST_PROXY: ',' }, /comma-separated proxy addresses/],
    // Regression (database review): a loose pattern let these through, and Fastify threw at startup.
    ...['face', '10.0.0.1/99', '999.1.1.1', '::::::', '::1/129', '10.0.0.0/8/8', '10.0.0.0/255.0.0.256', '0.0.0.0/0', '::/0', '10.0.0.0/0.0.0.0', '10.0.0.0/255.0.255.0', 'fe80::1%eth0.100', 'fe80::1%br-1a2b'].map(value =>
      ['TRUST_PROXY', { TRUST_PROXY: value }, /comma-separated proxy addresses/] as [string, NodeJS.ProcessEnv, RegExp]),
    ['PRESENCE_GRACE_MS', { PRESENCE_GRACE_MS: '3600001' }, /at most/],
    // Regression: LOG_LEVEL went unchecked to pino, which failed late without naming the variable.
    ['LOG_LEVEL', { LOG_LEVEL: 'verbose' }, /must be one of fatal, error, warn, info, debug, trace, silent/],
    ['LOG_LEVEL', { LOG_LEVEL: '30' }, /must be one of/],
    // Regression: a prefix of 92-100 characters passed here, then failed erp-presence's option
    // check on `<prefix>:presence` without naming the variable.
    ['REDIS_PREFIX', { REDIS_PREFIX: 'p'.repeat(92) }, /must be 1-91 letters/],
    ['SEED_DEMO', { SEED_DEMO: 'yes' }, /must be 1 or 0/],
    ['SEED_DEMO', { SEED_DEMO: '2' }, /must be 1 or 0/]
  ]
  for (const [variable, env, detail] of cases) {
    const err = failure(env)
    const what = `${variable}=${JSON.stringify(Object.values(env)[0])}`
    t.equal(err.variable, variable, `${what}: names ${variable}`)
    t.equal(err.name, 'ConfigError')
    t.match(err.message, new RegExp(`^Invalid configuration: ${variable} `), `${what}: message starts with the variable`)
    t.match(err.message, detail, `${what}: says what is wrong`)
    t.notMatch(err.message, /\n/, `${what}: one line`)
  }
})

// Regression: every start seeded the demo users (published password `demo-password`) into any
// empty database, production PostgreSQL included.
t.test('SEED_DEMO: demo data is seeded outside production by default, in production only when asked', async t => {
  const production = { NODE_ENV: 'production', JWT_SECRET: SECRET }
  t.equal(loadConfig({}).seedDemo, true, 'development: seeds')
  t.equal(loadConfig({ NODE_ENV: 'test' }).seedDemo, true, 'any NODE_ENV but production: seeds')
  t.equal(loadConfig(production).seedDemo, false, 'NODE_ENV=production: does not seed')
  t.equal(loadConfig({ ...production, SEED_DEMO: '' }).seedDemo, false, 'SEED_DEMO empty counts as unset')
  t.equal(loadConfig({ ...production, SEED_DEMO: '1' }).seedDemo, true, 'NODE_ENV=production SEED_DEMO=1: seeds')
  t.equal(loadConfig({ SEED_DEMO: '0' }).seedDemo, false, 'SEED_DEMO=0 turns it off in development')
  for (const [raw, value] of [[' TRUE ', true], ['false', false], ['True', true], ['0', false]] as const) {
    t.equal(loadConfig({ ...production, SEED_DEMO: raw }).seedDemo, value, `SEED_DEMO=${JSON.stringify(raw)}`)
  }
})

t.test('the first bad variable is reported, and a secret never appears in the message', async t => {
  const err = failure({ PORT: 'x', JWT_SECRET: 'tiny-secret' })
  t.equal(err.variable, 'PORT')
  const secret = failure({ JWT_SECRET: 'super-secret-value' })
  t.notMatch(secret.message, /super-secret-value/)
  const database = failure({ DATABASE_URL: 'mysql://user:hunter2@db/erp' })
  t.notMatch(database.message, /hunter2/, 'a password in a bad URL is not echoed')
})

t.test('REDIS_PREFIX of 91 characters is accepted; the database scripts need no JWT_SECRET in production', async t => {
  t.equal(loadConfig({ REDIS_PREFIX: 'p'.repeat(91) }).redisPrefix, 'p'.repeat(91))
  t.throws(() => loadConfig({ NODE_ENV: 'production' }), /JWT_SECRET/)
  t.equal(loadConfig({ NODE_ENV: 'production' }, { requireSecret: false }).production, true)
})

t.test('a server reachable from other machines gets no development secret and no demo users by default', async t => {
  const { isLoopback } = await import('../src/config.ts')
  for (const host of ['127.0.0.1', 'localhost', '::1', '[::1]', '127.0.1.1']) t.ok(isLoopback(host), `${host} is loopback`)
  for (const host of ['0.0.0.0', '::', '192.168.1.10', 'example.com', '128.0.0.1']) t.notOk(isLoopback(host), `${host} is not`)
  t.equal(loadConfig({}).seedDemo, true, 'the newcomer path (127.0.0.1) seeds the demo users')
  t.equal(loadConfig({ HOST: '0.0.0.0', JWT_SECRET: 'x'.repeat(40) }).seedDemo, false, 'not on every interface')
  t.equal(loadConfig({ HOST: '0.0.0.0', JWT_SECRET: 'x'.repeat(40), SEED_DEMO: '1' }).seedDemo, true, 'unless asked for')
  t.equal(loadConfig({ HOST: '0.0.0.0' }, { requireSecret: false }).jwtSecretIsDefault, true, 'the database scripts need no secret')
})

t.test('TRUST_PROXY: true, false, a number of hops or proxy addresses', async t => {
  t.equal(loadConfig({}).trustProxy, false, 'default: X-Forwarded-For is not believed')
  t.equal(loadConfig({ TRUST_PROXY: 'true' }).trustProxy, true)
  t.equal(loadConfig({ TRUST_PROXY: 'false' }).trustProxy, false)
  t.equal(loadConfig({ TRUST_PROXY: '2' }).trustProxy, 2)
  t.same(loadConfig({ TRUST_PROXY: '10.0.0.0/8, 127.0.0.1,::1' }).trustProxy, ['10.0.0.0/8', '127.0.0.1', '::1'])
  const named = loadConfig({ TRUST_PROXY: 'loopback, uniquelocal, 10.0.0.0/255.0.0.0, 192.168.0.0/255.255.255.255, fd00::/8, 10.1.0.0/0016' }).trustProxy
  t.same(named, ['loopback', 'uniquelocal', '10.0.0.0/255.0.0.0', '192.168.0.0/255.255.255.255', 'fd00::/8', '10.1.0.0/0016'], "proxy-addr's named ranges and an IPv4 netmask")
  // What is accepted, Fastify accepts.
  const { default: Fastify } = await import('fastify')
  await Fastify({ trustProxy: named as string[] }).close()
  // What is refused, Fastify refuses too (a range of 0, a netmask with a gap).
  for (const value of ['0.0.0.0/0', '::/0', '10.0.0.0/0.0.0.0', '10.0.0.0/255.0.255.0']) t.throws(() => Fastify({ trustProxy: [value] }), /invalid range/, value)
  for (const value of ['fe80::1%eth0.100', 'fe80::1%br-1a2b']) t.throws(() => Fastify({ trustProxy: [value] }), /invalid IP address/, value)
  // A zone of letters and digits is fine on both sides.
  t.same(loadConfig({ TRUST_PROXY: 'fe80::1%eth0' }).trustProxy, ['fe80::1%eth0'])
  await Fastify({ trustProxy: ['fe80::1%eth0'] }).close()
})
