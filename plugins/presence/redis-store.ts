import { createHash, randomUUID } from 'node:crypto'
import { Redis, ReplyError, type RedisOptions } from 'ioredis'
import { withTimeout } from '../support.ts'
import type { Viewing } from '../events.ts'
import { PartialSweepError, type Change, type Departure, type Expired, type Offline, type PresenceStore, type SocketRef, type Transition, type UserPresence } from './store.ts'

export interface RedisPresenceStoreOptions {
  /** A `redis://` / `rediss://` URL (the store opens and closes its own connection) or a client you own. */
  redis: string | Redis
  /** Prefix of every key. Default `'erp-realtime:presence'`. */
  prefix?: string
  /** ioredis options for a connection opened from a URL, over the defaults `{ maxRetriesPerRequest: 2, commandTimeout: 2000 }`. */
  redisOptions?: RedisOptions
  /** Close a client passed as `redis` when the store closes (one made for this store). Default false. */
  ownsClient?: boolean
  /** Called with connection errors (at most once per distinct message until the next 'ready'). */
  onError?: (err: Error) => void
}

/*
 * Keys (all under the prefix):
 *   users:<companyId>    hash   userId   -> JSON { status, devices, since, rev, viewing? }
 *   sockets:<companyId>  hash   socketId -> userId
 *   rev:<companyId>      string the company's revision counter: every mutation of a user's presence
 *                               takes the next value (at least the Redis clock in ms) as the user's
 *                               `rev`. It is not deleted when the company empties (one small key
 *                               per company), so revs keep growing across offline and back and a
 *                               late, stale announcement never wins.
 *   epoch                string the data's epoch (the Redis clock when first written): a store that
 *                               lost its data (restart without persistence, flush) starts a new
 *                               one, so a node can tell a user forgotten by that loss from one
 *                               another node's sweep ended, and announce the offline itself.
 *   swept:<member>       string left for SWEPT_TTL_MS by a sweep that claimed a socket entry (the
 *                               member) or a grace period (value: its deadline). A socket or grace
 *                               period unknown to the store without one was not ended by a sweep:
 *                               its data was lost, or rolled back (a failover to a lagging replica
 *                               or an older snapshot keeps the same epoch), and its own node
 *                               announces the offline.
 *   expiry               zset   JSON ["s", companyId, userId, socketId] (socket entry) or
 *                               JSON ["g", companyId, userId] (grace period) -> deadline, ms (Redis clock)
 * One expiry set for all companies lets every node find due entries with one ZRANGEBYSCORE; each
 * due entry is then claimed by a script that removes it only if it is still due, so exactly one
 * node announces it. Members are built in JavaScript only, so their bytes always match.
 */

const NOW = `local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
`

// bump(counterKey, user?) -> the next revision: never at or below the user's current rev (should
// the counter have been deleted while the user was present), nor below the Redis clock in ms.
// The clock floor keeps revs growing when Redis loses its data (a restart without persistence, a
// flush, an older snapshot): nodes and clients still hold the revs given out before, and would
// drop every change numbered from 1 again. 13 digits: exact in cjson's 14-digit numbers.
const REV = `local function bump (key, u)
  local t = redis.call('TIME')
  local floor = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local rev = redis.call('INCR', key)
  if u and u.rev and u.rev >= floor then floor = u.rev + 1 end
  if rev < floor then
    rev = floor
    redis.call('SET', key, rev)
  end
  return rev
end
`

// dropSocket(users, sockets, revKey, userId, socketId) -> the user with one device less and a
// new rev (not yet written back), or nil when the socket or the user is already gone.
const DROP_SOCKET = REV + `local function dropSocket (users, sockets, revKey, userId, socketId)
  if redis.call('HDEL', sockets, socketId) == 0 then return nil end
  local raw = redis.call('HGET', users, userId)
  if not raw then return nil end
  local u = cjson.decode(raw)
  u.devices = math.max(0, u.devices - 1)
  u.rev = bump(revKey, u)
  return u
end
`

// How long a mutating script's reply is kept under its op key (see Script): longer than any
// reconnect after which ioredis re-sends the commands whose replies it did not get.
const OP_REPLY_TTL_MS = 15_000
// How long close waits for QUIT's reply before dropping the connection.
const CLOSE_QUIT_MS = 1000
// A presence change whose reply did not come is tried once more after this long (same op key: see run()).
const RETRY_MS = 50
// How long a sweep's claim is remembered (swept:<member>): a node that was stalled that long
// after its socket expired, and then sees it leave, announces a second offline (harmless: a
// newer rev of the same state) instead of none.
const SWEPT_TTL_MS = 600_000

class Script {
  readonly sha: string
  readonly source: string
  /**
   * `once`: the script is safe to run twice. ioredis re-sends a command whose reply was lost with
   * the connection (autoResendUnfulfilledCommands); a mutating script run again would find its
   * own work done and answer "nothing changed", and its announcement would be lost (a user left
   * online for good). Such a script gets a unique op key as its last KEY: the first run keeps its
   * reply there, and a second run answers that reply without doing anything.
   */
  constructor (body: string, readonly once = false) {
    this.source = once
      ? `local opKey = KEYS[#KEYS]
local done = redis.call('GET', opKey)
if done then return cjson.decode(done)[1] end
local function body ()
${body}
end
local reply = body()
redis.call('SET', opKey, cjson.encode({ reply }), 'PX', ${OP_REPLY_TTL_MS})
return reply`
      : body
    this.sha = createHash('sha1').update(this.source).digest('hex')
  }
}

// KEYS users, sockets, expiry, rev, epoch; ARGV userId, socketId, socketMember, graceMember, ttlMs
const CONNECT = new Script(NOW + REV + `
local epoch = redis.call('GET', KEYS[5])
if not epoch then
  epoch = t[1] .. '.' .. t[2]
  redis.call('SET', KEYS[5], epoch)
end
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local u
if raw then u = cjson.decode(raw) else u = { status = 'online', devices = 0, since = now } end
if redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[1]) == 1 then u.devices = u.devices + 1 end
u.rev = bump(KEYS[4], u)
local after = cjson.encode(u)
redis.call('HSET', KEYS[1], ARGV[1], after)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[4])
return { raw or '', after, epoch }`, true)

// KEYS users, sockets, expiry, rev, epoch, swept; ARGV userId, socketId, socketMember, graceMember, graceMs, epoch
// { userJSON, graceUntil | '' }; { 'lost', rev } when the socket was recorded (epoch given), is
// unknown now without a sweep having claimed it (its data was lost or rolled back), and the user
// is unknown too (offline now); false when the socket is unknown otherwise.
const DISCONNECT = new Script(NOW + DROP_SOCKET + `
redis.call('ZREM', KEYS[3], ARGV[3])
local u = dropSocket(KEYS[1], KEYS[2], KEYS[4], ARGV[1], ARGV[2])
if not u then
  if ARGV[6] ~= '' and (redis.call('GET', KEYS[5]) ~= ARGV[6] or redis.call('EXISTS', KEYS[6]) == 0) and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
    return { 'lost', tostring(bump(KEYS[4], nil)) }
  end
  return false
end
local after = cjson.encode(u)
redis.call('HSET', KEYS[1], ARGV[1], after)
if u.devices > 0 then return { after, '' } end
local graceUntil = now + tonumber(ARGV[5])
redis.call('ZADD', KEYS[3], graceUntil, ARGV[4])
return { after, tostring(graceUntil) }`, true)

// KEYS users, rev; ARGV userId, status, viewing ('' keeps, 'null' clears, else JSON)
// A set that changes nothing writes nothing (and takes no revision).
const SET = new Script(NOW + REV + `
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return false end
local u = cjson.decode(raw)
local changed = false
if u.status ~= ARGV[2] then u.status = ARGV[2]; u.since = now; changed = true end
if ARGV[3] == 'null' then
  if u.viewing then changed = true end
  u.viewing = nil
elseif ARGV[3] ~= '' then
  local v = cjson.decode(ARGV[3])
  if not u.viewing or u.viewing.type ~= v.type or u.viewing.id ~= v.id then changed = true end
  u.viewing = v
end
if not changed then return { raw, raw } end
u.rev = bump(KEYS[2], u)
local after = cjson.encode(u)
redis.call('HSET', KEYS[1], ARGV[1], after)
return { raw, after }`, true)

// KEYS users, expiry, rev, epoch, swept; ARGV userId, graceMember, mode ('exact' | 'due'), deadline, epoch
// Returns the offline's rev when the user went offline, else 0. 'exact' ends the grace period
// this node started (also when its data has been lost or rolled back since: no sweep claimed it,
// and the user is unknown); 'due' (the sweep) ends any grace period whose deadline has passed.
const END_GRACE = new Script(REV + `
local score = redis.call('ZSCORE', KEYS[2], ARGV[2])
if not score then
  if ARGV[3] == 'exact' and ARGV[5] ~= '' and (redis.call('GET', KEYS[4]) ~= ARGV[5] or tonumber(redis.call('GET', KEYS[5]) or '-1') ~= tonumber(ARGV[4])) and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
    return bump(KEYS[3], nil)
  end
  return 0
end
if ARGV[3] == 'exact' and tonumber(score) ~= tonumber(ARGV[4]) then return 0 end
if ARGV[3] == 'due' and tonumber(score) > tonumber(ARGV[4]) then return 0 end
redis.call('ZREM', KEYS[2], ARGV[2])
if ARGV[3] == 'due' then redis.call('SET', KEYS[5], score, 'PX', ${SWEPT_TTL_MS}) end
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local u = cjson.decode(raw)
if u.devices > 0 then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return bump(KEYS[3], u)`, true)

// KEYS users, sockets, expiry, rev, swept; ARGV userId, socketId, socketMember, now
// Claims an expired socket entry: { 'offline', rev } or { 'devices', userJSON }, false when not due or gone.
const EXPIRE_SOCKET = new Script(DROP_SOCKET + `
local score = redis.call('ZSCORE', KEYS[3], ARGV[3])
if not score or tonumber(score) > tonumber(ARGV[4]) then return false end
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('SET', KEYS[5], '1', 'PX', ${SWEPT_TTL_MS})
local u = dropSocket(KEYS[1], KEYS[2], KEYS[4], ARGV[1], ARGV[2])
if not u then return false end
if u.devices == 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return { 'offline', u.rev }
end
local after = cjson.encode(u)
redis.call('HSET', KEYS[1], ARGV[1], after)
return { 'devices', after }`, true)

// KEYS expiry; ARGV limit -> { now, member... }
const DUE = new Script(NOW + `
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
table.insert(due, 1, tostring(now))
return due`)

// KEYS expiry; ARGV ttlMs, member... -> members no longer present
const REFRESH = new Script(NOW + `
local at = now + tonumber(ARGV[1])
local missing = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], at, ARGV[i])
  else
    missing[#missing + 1] = ARGV[i]
  end
end
return missing`)

const REFRESH_BATCH = 1000

interface StoredPresence {
  status: UserPresence['status']
  devices: number
  since: number
  /** Absent in entries written before revisions existed: read as 0. */
  rev?: number
  viewing?: Viewing
}

const parse = (raw: string): UserPresence => {
  const stored = JSON.parse(raw) as StoredPresence
  const presence: UserPresence = { status: stored.status, devices: stored.devices, since: stored.since, rev: stored.rev ?? 0 }
  if (stored.viewing) presence.viewing = { type: String(stored.viewing.type), id: String(stored.viewing.id) }
  return presence
}

/** Presence shared by every node on one Redis (the multi-node store). */
export class RedisPresenceStore implements PresenceStore {
  readonly kind = 'redis'
  readonly redis: Redis
  readonly prefix: string
  private readonly owned: boolean
  private readonly onErrorListener: (err: Error) => void
  private readonly onReadyListener: () => void

  constructor (options: RedisPresenceStoreOptions) {
    this.prefix = options.prefix ?? 'erp-realtime:presence'
    this.owned = typeof options.redis === 'string' || options.ownsClient === true
    this.redis = typeof options.redis === 'string'
      // commandTimeout: a Redis that stops answering (connection open, no replies) fails
      // presence calls (SERVICE_UNAVAILABLE) instead of leaving acks and the app's close waiting.
      ? new Redis(options.redis, { maxRetriesPerRequest: 2, commandTimeout: 2000, ...options.redisOptions })
      : options.redis
    // An 'error' event without a listener would crash the process; report each outage once.
    let lastReported = ''
    this.onErrorListener = (err: Error) => {
      if (err.message === lastReported) return
      lastReported = err.message
      options.onError?.(err)
    }
    this.onReadyListener = () => { lastReported = '' }
    this.redis.on('error', this.onErrorListener)
    this.redis.on('ready', this.onReadyListener)
  }

  private usersKey (companyId: string) { return `${this.prefix}:users:${companyId}` }
  private socketsKey (companyId: string) { return `${this.prefix}:sockets:${companyId}` }
  private revKey (companyId: string) { return `${this.prefix}:rev:${companyId}` }
  private get expiryKey () { return `${this.prefix}:expiry` }
  private get epochKey () { return `${this.prefix}:epoch` }
  private socketMember (ref: SocketRef) { return JSON.stringify(['s', ref.companyId, ref.userId, ref.socketId]) }
  private graceMember (companyId: string, userId: string) { return JSON.stringify(['g', companyId, userId]) }
  private sweptKey (member: string) { return `${this.prefix}:swept:${member}` }

  private async send<T> (script: Script, keys: string[], args: Array<string | number>): Promise<T> {
    try {
      return await this.redis.evalsha(script.sha, keys.length, ...keys, ...args) as T
    } catch (err) {
      // First use on this server (or after SCRIPT FLUSH): send the source once.
      if (!(err instanceof Error) || !err.message.startsWith('NOSCRIPT')) throw err
      return await this.redis.eval(script.source, keys.length, ...keys, ...args) as T
    }
  }

  /**
   * Runs a script. One that changes presence (`once`) is tried a second time under the same op
   * key when its reply did not come (commandTimeout, a lost connection): it may have run, and then
   * only its kept reply says what to announce. Without it, a connect that ran announced no online,
   * a grace period that ended no offline (its entry gone, no sweep would claim it: the user
   * online for good), a status change nothing. A script error (ReplyError) is not retried: the
   * script stopped part-way, and a second run would find its first writes done and report
   * nothing, hiding the error.
   */
  private async run<T> (script: Script, keys: string[], args: Array<string | number>): Promise<T> {
    if (!script.once) return await this.send<T>(script, keys, args)
    const opKeys = [...keys, `${this.prefix}:op:${randomUUID()}`]
    try {
      return await this.send<T>(script, opKeys, args)
    } catch (err) {
      if (err instanceof ReplyError) throw err
      await new Promise(resolve => setTimeout(resolve, RETRY_MS))
      return await this.send<T>(script, opKeys, args)
    }
  }

  async connect (ref: SocketRef, ttlMs: number): Promise<Transition> {
    const [before, after, epoch] = await this.run<[string, string, string]>(CONNECT,
      [this.usersKey(ref.companyId), this.socketsKey(ref.companyId), this.expiryKey, this.revKey(ref.companyId), this.epochKey],
      [ref.userId, ref.socketId, this.socketMember(ref), this.graceMember(ref.companyId, ref.userId), ttlMs])
    return { before: before === '' ? null : parse(before), after: parse(after), epoch }
  }

  async disconnect (ref: SocketRef, graceMs: number, epoch = ''): Promise<Departure | null> {
    const result = await this.run<[string, string] | null>(DISCONNECT,
      [this.usersKey(ref.companyId), this.socketsKey(ref.companyId), this.expiryKey, this.revKey(ref.companyId), this.epochKey, this.sweptKey(this.socketMember(ref))],
      [ref.userId, ref.socketId, this.socketMember(ref), this.graceMember(ref.companyId, ref.userId), graceMs, epoch])
    if (!result) return null
    if (result[0] === 'lost') return { after: null, rev: Number(result[1]) }
    const departure: Departure = { after: parse(result[0]) }
    if (result[1] !== '') departure.graceUntil = Number(result[1])
    return departure
  }

  async set (companyId: string, userId: string, change: { status: UserPresence['status'], viewing?: Viewing | null }): Promise<Change | null> {
    const viewing = change.viewing === undefined ? '' : change.viewing === null ? 'null' : JSON.stringify({ type: change.viewing.type, id: change.viewing.id })
    const result = await this.run<[string, string] | null>(SET, [this.usersKey(companyId), this.revKey(companyId)], [userId, change.status, viewing])
    return result ? { before: parse(result[0]), after: parse(result[1]) } : null
  }

  async endGrace (companyId: string, userId: string, graceUntil: number, epoch = ''): Promise<Offline | null> {
    const member = this.graceMember(companyId, userId)
    const rev = await this.run<number>(END_GRACE, [this.usersKey(companyId), this.expiryKey, this.revKey(companyId), this.epochKey, this.sweptKey(member)],
      [userId, member, 'exact', graceUntil, epoch])
    return rev > 0 ? { rev } : null
  }

  async refresh (refs: SocketRef[], ttlMs: number): Promise<SocketRef[]> {
    const missing: SocketRef[] = []
    for (let i = 0; i < refs.length; i += REFRESH_BATCH) {
      const batch = refs.slice(i, i + REFRESH_BATCH)
      const byMember = new Map(batch.map(ref => [this.socketMember(ref), ref]))
      const gone = await this.run<string[]>(REFRESH, [this.expiryKey], [ttlMs, ...byMember.keys()])
      for (const member of gone) missing.push(byMember.get(member)!)
    }
    return missing
  }

  async sweep (limit: number): Promise<Expired[]> {
    const [now, ...due] = await this.run<string[]>(DUE, [this.expiryKey], [limit])
    // Sent together: ioredis writes them back to back on one connection (one round trip).
    const claims = due.map(async (member): Promise<Expired | null> => {
      let parsed: unknown
      try {
        parsed = JSON.parse(member)
      } catch {
        parsed = null
      }
      if (!Array.isArray(parsed) || !parsed.every(part => typeof part === 'string')) {
        await this.redis.zrem(this.expiryKey, member) // not ours: never let it block the sweep
        return null
      }
      const [kind, companyId, userId, socketId] = parsed as string[]
      if (kind === 'g' && companyId && userId) {
        const rev = await this.run<number>(END_GRACE, [this.usersKey(companyId), this.expiryKey, this.revKey(companyId), this.epochKey, this.sweptKey(member)], [userId, member, 'due', now!, ''])
        return rev > 0 ? { companyId, userId, after: null, rev } : null
      }
      if (kind === 's' && companyId && userId && socketId) {
        const result = await this.run<['offline', number] | ['devices', string] | null>(EXPIRE_SOCKET,
          [this.usersKey(companyId), this.socketsKey(companyId), this.expiryKey, this.revKey(companyId), this.sweptKey(member)], [userId, socketId, member, now!])
        if (!result) return null
        if (result[0] === 'offline') return { companyId, userId, after: null, rev: Number(result[1]) }
        const after = parse(result[1])
        return { companyId, userId, after, rev: after.rev }
      }
      await this.redis.zrem(this.expiryKey, member)
      return null
    })
    // Each claim removes its entry when it succeeds: one failure must not hide the others.
    const settled = await Promise.allSettled(claims)
    const claimed = settled.flatMap(result => result.status === 'fulfilled' && result.value !== null ? [result.value] : [])
    const errors = settled.flatMap(result => result.status === 'rejected' ? [result.reason] : [])
    if (errors.length > 0) throw new PartialSweepError(errors, claimed)
    return claimed
  }

  async list (companyId: string): Promise<Array<UserPresence & { userId: string }>> {
    const all = await this.redis.hgetall(this.usersKey(companyId))
    return Object.entries(all).map(([userId, raw]) => ({ userId, ...parse(raw) }))
  }

  async close (): Promise<void> {
    if (!this.owned) {
      this.redis.off('error', this.onErrorListener)
      this.redis.off('ready', this.onReadyListener)
      return
    }
    // QUIT bounded: a Redis that stopped answering (or a client that waits for it without limit)
    // must not hold the app's close.
    if (this.redis.status === 'ready') await withTimeout(this.redis.quit().catch(() => {}), CLOSE_QUIT_MS, undefined)
    this.redis.disconnect()
    // Keep a listener: a late socket error on a closed connection must not crash the process.
    this.redis.off('ready', this.onReadyListener)
  }
}
