import { isIP } from 'node:net'
import path from 'node:path'
import { z } from 'zod'

/** Dev-only signing key used when JWT_SECRET is unset outside production. */
export const DEV_JWT_SECRET = 'erp-realtime-dev-secret-do-not-use-in-production'

/** pino's levels, LOG_LEVEL's accepted values. */
export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const
export type LogLevel = (typeof LOG_LEVELS)[number]

export interface AppConfig {
  port: number
  host: string
  /** PostgreSQL connection string; undefined selects embedded PGlite under `dataDir`. */
  databaseUrl?: string
  /** Distinct SQL texts prepared once per connection (DATABASE_PREPARED_STATEMENTS; 0: none, for PgBouncer's transaction mode before 1.21). Unset: openDatabase's default. */
  preparedStatements?: number
  /** How long getting a PostgreSQL connection may take, waiting for a free pool slot included (DATABASE_CONNECT_TIMEOUT_MS; 0: no limit). Unset: openDatabase's default (5000). */
  databaseConnectTimeoutMs?: number
  /** How long a PostgreSQL statement may wait for its reply before its connection is closed and it fails (DATABASE_QUERY_TIMEOUT_MS; 0: no limit; migrations are not bounded). Unset: openDatabase's default (30000). */
  databaseQueryTimeoutMs?: number
  /** How long the migrations of `npm start` and `npm run db:migrate` wait for another session's migration lock (DATABASE_MIGRATION_LOCK_TIMEOUT_MS). Unset: the runner's default (10000, as prisma migrate deploy). */
  migrationLockTimeoutMs?: number
  dataDir: string
  redisUrl?: string
  jwtSecret: string
  /** True when JWT_SECRET was unset and the dev secret is in use. */
  jwtSecretIsDefault: boolean
  corsOrigins: string[]
  eventLogTtlSeconds: number
  eventLogMaxLen: number
  presenceGraceMs: number
  /** POST /auth/login attempts per minute from one client address; 0: no limit. */
  loginAttemptsPerMinute: number
  /** Fastify's `trustProxy` (TRUST_PROXY): whose X-Forwarded-For gives `request.ip`. Default false. */
  trustProxy: boolean | number | string[]
  production: boolean
  /** Key/channel prefix in Redis (REDIS_PREFIX), so several deployments can share one Redis. Unset: the plugins' default. */
  redisPrefix?: string
  /** How often each node checks stream heads, fills gaps and sends `sync:head` (SYNC_HEAD_INTERVAL_MS; 0 disables). Unset: the plugin's default. */
  syncHeadIntervalMs?: number
  /** pino log level of the server (LOG_LEVEL, case-insensitive). Default 'info'. */
  logLevel: LogLevel
  /** Whether `npm start` seeds the demo companies and users (published password) into an empty database (SEED_DEMO=1/0). Default: outside production only. */
  seedDemo: boolean
}

/** Thrown for bad configuration; its message is one line naming the variable. */
export class ConfigError extends Error {
  constructor (public readonly variable: string, detail: string) {
    super(`Invalid configuration: ${variable} ${detail}`)
    this.name = 'ConfigError'
  }
}

const integer = (min: number, max: number) =>
  z.string().trim().regex(/^\d+$/, 'must be a whole number').transform(Number)
    .pipe(z.number().int().min(min, `must be at least ${min}`).max(max, `must be at most ${max}`))

const url = (protocols: string[]) => z.string().trim().refine(value => {
  try {
    return protocols.includes(new URL(value).protocol)
  } catch {
    return false
  }
}, `must be a URL starting with ${protocols.map(p => `${p}//`).join(' or ')}`)

const origins = z.string().transform(value => value.split(',').map(o => o.trim()).filter(Boolean))
  .pipe(z.array(z.string().regex(/^https?:\/\/[^/\s]+$/, 'must list exact origins like https://app.example.com (scheme://host[:port], comma-separated)')))

// One parser per variable, so a failure names exactly the variable at fault.
const variables = {
  PORT: integer(0, 65535),
  HOST: z.string().trim().min(1, 'must not be empty'),
  DATABASE_URL: url(['postgres:', 'postgresql:']).refine(value => {
    // Prisma's `?schema=` is not read by pg; the app's queries name the public schema.
    if (!URL.canParse(value)) return true // reported by the check above
    const schema = new URL(value).searchParams.get('schema')
    return schema === null || schema === 'public'
  }, 'must not name a schema other than public (?schema=): the app\'s tables are in the public schema'),
  DATABASE_PREPARED_STATEMENTS: integer(0, 10_000),
  DATABASE_CONNECT_TIMEOUT_MS: integer(0, 600_000),
  DATABASE_QUERY_TIMEOUT_MS: integer(0, 3_600_000),
  DATABASE_MIGRATION_LOCK_TIMEOUT_MS: integer(0, 3_600_000),
  DATA_DIR: z.string().trim().min(1, 'must not be empty'),
  REDIS_URL: url(['redis:', 'rediss:']),
  JWT_SECRET: z.string().min(32, 'must be at least 32 characters (HS256 key)'),
  CORS_ORIGINS: origins,
  EVENT_LOG_TTL_SECONDS: integer(1, 365 * 24 * 3600),
  EVENT_LOG_MAXLEN: integer(1, 10_000_000),
  PRESENCE_GRACE_MS: integer(0, 3_600_000),
  LOGIN_ATTEMPTS_PER_MINUTE: integer(0, 100_000),
  // Fastify's trustProxy: true/false, a number of hops, or the proxies' addresses/CIDRs.
  TRUST_PROXY: z.string().trim().transform((value): boolean | number | string[] => {
    if (value === 'true') return true
    if (value === 'false') return false
    if (/^\d+$/.test(value)) return Number(value)
    return value.split(',').map(v => v.trim()).filter(Boolean)
  }).refine(v => !Array.isArray(v) || (v.length > 0 && v.every(proxyAddress)),
    'must be true, false, a number of proxy hops, or comma-separated proxy addresses (CIDR allowed, or loopback, linklocal, uniquelocal)'),
  // 91: the app derives `<REDIS_PREFIX>:presence`, and Redis prefixes are at most 100 characters.
  REDIS_PREFIX: z.string().trim().regex(/^[\w.:-]{1,91}$/, 'must be 1-91 letters, digits, or . : _ -'),
  SYNC_HEAD_INTERVAL_MS: integer(0, 3_600_000),
  LOG_LEVEL: z.string().trim().toLowerCase().pipe(z.enum(LOG_LEVELS, { error: `must be one of ${LOG_LEVELS.join(', ')}` })),
  SEED_DEMO: z.string().trim().toLowerCase().pipe(z.enum(['1', '0', 'true', 'false'], { error: 'must be 1 or 0 (or true, false)' }))
    .transform(value => value === '1' || value === 'true')
} as const

type Parsed = { [K in keyof typeof variables]?: z.output<(typeof variables)[K]> }

/**
 * One entry of TRUST_PROXY as Fastify's proxy-addr takes it: an IP address, with a prefix length
 * up to its family's bits or an IPv4 netmask, or one of its named ranges. A loose pattern let
 * `face` or `10.0.0.1/99` through, and Fastify then threw at startup.
 */
function proxyAddress (entry: string): boolean {
  if (['loopback', 'linklocal', 'uniquelocal'].includes(entry)) return true
  const [address = '', range, ...rest] = entry.split('/')
  const family = isIP(address)
  if (family === 0 || rest.length > 0) return false
  // An IPv6 zone: proxy-addr's parser takes letters and digits only (not eth0.100, br-1a2b).
  if (address.includes('%') && !/%[0-9a-z]+$/i.test(address)) return false
  if (range === undefined) return true
  // proxy-addr refuses a range of 0 (0.0.0.0/0: trust every address, use `true` for that).
  if (/^\d+$/.test(range)) return Number(range) >= 1 && Number(range) <= (family === 4 ? 32 : 128)
  if (family !== 4 || isIP(range) !== 4) return false
  // A netmask: its ones contiguous from the top, and at least one.
  const mask = range.split('.').reduce((bits, octet) => bits * 256 + Number(octet), 0)
  const inverted = 0xffffffff - mask
  return mask !== 0 && (inverted & (inverted + 1)) === 0
}

/**
 * Reads the configuration from an environment; throws ConfigError on the first bad variable.
 * `requireSecret: false` (the database scripts) lets production run without JWT_SECRET.
 */
export function loadConfig (env: NodeJS.ProcessEnv = process.env, { requireSecret = true }: { requireSecret?: boolean } = {}): AppConfig {
  const parsed: Parsed = {}
  for (const [name, schema] of Object.entries(variables)) {
    const raw = env[name]
    if (raw === undefined || raw === '') continue
    const result = schema.safeParse(raw)
    if (!result.success) throw new ConfigError(name, result.error.issues[0]?.message ?? 'is invalid')
    ;(parsed as Record<string, unknown>)[name] = result.data
  }
  const production = env.NODE_ENV === 'production'
  // Listening beyond this machine (HOST=0.0.0.0, say) with the published development secret or
  // the demo users would let anyone who reaches it forge tokens or log in, whatever NODE_ENV says.
  const exposed = !isLoopback(parsed.HOST ?? '127.0.0.1')
  if ((parsed.JWT_SECRET === undefined || parsed.JWT_SECRET === DEV_JWT_SECRET) && (production || exposed) && requireSecret) {
    throw new ConfigError('JWT_SECRET', production
      ? 'must be set to your own secret when NODE_ENV=production'
      : `must be set to your own secret when HOST (${parsed.HOST}) is not a loopback address: the development secret is published`)
  }
  return {
    port: parsed.PORT ?? 3000,
    host: parsed.HOST ?? '127.0.0.1',
    databaseUrl: parsed.DATABASE_URL,
    preparedStatements: parsed.DATABASE_PREPARED_STATEMENTS,
    databaseConnectTimeoutMs: parsed.DATABASE_CONNECT_TIMEOUT_MS,
    databaseQueryTimeoutMs: parsed.DATABASE_QUERY_TIMEOUT_MS,
    migrationLockTimeoutMs: parsed.DATABASE_MIGRATION_LOCK_TIMEOUT_MS,
    dataDir: parsed.DATA_DIR ?? '.data',
    redisUrl: parsed.REDIS_URL,
    jwtSecret: parsed.JWT_SECRET ?? DEV_JWT_SECRET,
    jwtSecretIsDefault: parsed.JWT_SECRET === undefined,
    corsOrigins: parsed.CORS_ORIGINS ?? [],
    eventLogTtlSeconds: parsed.EVENT_LOG_TTL_SECONDS ?? 86400,
    eventLogMaxLen: parsed.EVENT_LOG_MAXLEN ?? 10000,
    presenceGraceMs: parsed.PRESENCE_GRACE_MS ?? 5000,
    loginAttemptsPerMinute: parsed.LOGIN_ATTEMPTS_PER_MINUTE ?? 20,
    trustProxy: parsed.TRUST_PROXY ?? false,
    production,
    redisPrefix: parsed.REDIS_PREFIX,
    syncHeadIntervalMs: parsed.SYNC_HEAD_INTERVAL_MS,
    logLevel: parsed.LOG_LEVEL ?? 'info',
    // The demo users' password is published: never seeded in production, nor on a server
    // reachable from other machines, unless asked for.
    seedDemo: parsed.SEED_DEMO ?? (!production && !exposed)
  }
}

/** Whether `host` only listens on this machine: localhost, 127.0.0.0/8, ::1. */
export function isLoopback (host: string): boolean {
  const h = host.toLowerCase().replace(/^\[|\]$/g, '')
  return h === 'localhost' || h === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h) || h === '::ffff:127.0.0.1'
}

/** The database options of a configuration (`openDatabase`), shared by `npm start` and the database scripts. */
export const databaseOptions = (config: AppConfig) => ({
  url: config.databaseUrl,
  dataDir: path.join(config.dataDir, 'pglite'),
  preparedStatements: config.preparedStatements,
  connectTimeoutMs: config.databaseConnectTimeoutMs,
  queryTimeoutMs: config.databaseQueryTimeoutMs
})
