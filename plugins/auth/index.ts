import fp from 'fastify-plugin'
import fastifyJwt from '@fastify/jwt'
import type { FastifyInstance, FastifyReply, FastifyRequest, RouteOptions } from 'fastify'
import type { ExtendedError } from 'socket.io'
import { z } from 'zod'
import { batchPerTurn, every, hookList, MAX_TIMER_MS, parseOptions, sqlErrorOf, refuseTakenDecorators } from '../support.ts'
import { Prisma, type PrismaClient } from '../../src/generated/prisma/client.ts'
import { Errors, type ErrorCode } from '../errors.ts'
import { authRefreshSchema, companyStream, ROLES, userStream, type Role } from '../events.ts'
import { listener, SocketError, type ErpSocket } from '../socket/handle.ts'
import type { WriteGuard } from '../offline-queue/index.ts'

export interface ErpAuthOptions {
  /** HS256 signing key, at least 32 characters. Required. */
  secret: string
  /** Prisma client used for the membership check. Required. */
  prisma: PrismaClient
  /** Lifetime of tokens issued with `fastify.erpAuth.sign`, in seconds. Default 3600. */
  tokenTtlSeconds?: number
  /**
   * How often a node re-checks the membership of its connected sockets, in ms: a socket whose
   * user was removed from the company or deactivated gets `auth:revoked` and is disconnected.
   * `fastify.erpAuth.recheck(userId)` does it at once. Default 60000; 0 turns the timer off.
   */
  membershipRecheckMs?: number
}

/** Claims of an erp-realtime token. */
export interface TokenClaims {
  sub: string
  companyId: string
  role: Role
  iat?: number
  exp?: number
}

/** Who is calling, after the membership check (role as stored, not as claimed). */
export interface AuthUser {
  userId: string
  companyId: string
  role: Role
  exp: number
}

export interface ErpAuthDecorator {
  /** Signs a token for a user in a company (HS256, `tokenTtlSeconds`). */
  sign (claims: { sub: string, companyId: string, role: Role }): string
  /** Verifies signature, algorithm, expiry and claim shape; throws an error with a stable code. */
  verify (token: string): Required<TokenClaims>
  /** The user's role in the company, or null when the user is missing, inactive or not a member. */
  membership (userId: string, companyId: string, db?: Pick<PrismaClient, '$queryRaw'>): Promise<Role | null>
  /** Verify + membership: the full check used for HTTP and for the socket handshake. */
  authenticate (token: string): Promise<AuthUser>
  /**
   * Heads of `company:<id>` and `user:<id>` as read by an accepted socket's handshake check (in
   * the membership query, before the socket joined its rooms); once per socket, then undefined.
   */
  takeHandshakeHeads (socket: object): ReadonlyMap<string, number> | undefined
  /**
   * The membership check of a route configured with `erpAuth: { membership: 'in-write' }`, for
   * `eventLog.commit({ guard })`, or checked again before the commit of a `'before'` route's
   * write (`eventLog.transaction(fn, { guard })`, `conflicts.update({ guard })`): checked in the write's own statement, which writes nothing if
   * the caller is not an active member (403 AUTH_NOT_A_MEMBER) or, with `roles`, if the stored
   * role is not one of them (403 FORBIDDEN). Once it passed, `request.user.role` is the stored role.
   */
  writeGuard (request: FastifyRequest, roles?: readonly Role[]): WriteGuard
  /**
   * Checks the membership now (one query) if the request's route deferred it to its write
   * ('in-write') and it has not passed yet; otherwise does nothing. For a request that answers
   * without writing, e.g. erp-idempotency's replay of a stored response.
   */
  checkMembership (request: FastifyRequest): Promise<void>
  /**
   * Re-checks the membership of connected sockets now, on every node (of one user, or all):
   * sockets whose user is no longer an active member of their company get `auth:revoked` and
   * are disconnected; a changed role is taken over. Call it after removing a membership or
   * deactivating a user. Resolves with the number of sockets cut on this node.
   */
  recheck (userId?: string): Promise<number>
  /**
   * Whether a connected socket's user is still an active member of its company: answered at
   * once when its membership passed a check in the last 5 s (its handshake, a re-check),
   * otherwise checked now (one query, shared with checks in the same turn). A lost membership
   * revokes the socket (`auth:revoked`, disconnect) and resolves false. erp-offline-queue asks
   * before a `sync:resume` replays a stream's history.
   */
  confirmSocket (socket: ErpSocket): Promise<boolean>
}

/** When a route's membership check runs (route option `config.erpAuth.membership`). */
export type MembershipCheck = 'before' | 'in-write'

declare module '@fastify/jwt' {
  interface FastifyJWT {
    payload: TokenClaims
    user: AuthUser
  }
}

declare module 'fastify' {
  interface FastifyContextConfig {
    erpAuth?: {
      /**
       * 'before' (default): `authenticate` verifies the token and queries the membership before
       * the handler; a write that may wait afterwards (a queue, a row lock, a pooled connection)
       * passes `writeGuard(request)` too (`eventLog.transaction(fn, { guard })`), so a member
       * removed meanwhile commits nothing. 'in-write': `authenticate` verifies the token only, and the handler's one
       * write checks the membership in the same statement (`eventLog.commit({ guard:
       * fastify.erpAuth.writeGuard(request) })`), one database round trip less. Until then
       * `request.user.role` is the token's claim; a response below 400 without a passed guard
       * is turned into a 500 AUTH_MEMBERSHIP_UNCHECKED.
       */
      membership?: MembershipCheck
    }
  }
  interface FastifyInstance {
    erpAuth: ErpAuthDecorator
    /** preHandler: authenticates `Authorization: Bearer <token>` and sets `request.user`. */
    authenticate (request: FastifyRequest): Promise<void>
  }
}

const claimsSchema = z.object({
  sub: z.string().min(1).max(128),
  companyId: z.string().min(1).max(128),
  role: z.enum(ROLES),
  iat: z.number().int(),
  exp: z.number().int()
})

const optionsSchema = z.object({
  secret: z.string({ error: 'is required' }).min(32, 'must be at least 32 characters'),
  prisma: z.custom<PrismaClient>(v => typeof v === 'object' && v !== null && 'membership' in v, 'must be a PrismaClient with the erp-realtime models'),
  tokenTtlSeconds: z.number().int().min(1).max(30 * 24 * 3600).default(3600),
  membershipRecheckMs: z.number().int().max(24 * 3600 * 1000)
    .refine(ms => ms === 0 || ms >= 100, 'must be 0 (off) or at least 100').default(60_000)
}).strict()

// Sockets re-checked per membership query; handshakes' lookups go in between.
const RECHECK_SLICE = 500
// A membership that passed a check this recently is taken as current by confirmSocket: a
// reconnect's resume, right after its handshake's check, costs no second query.
const MEMBERSHIP_FRESH_MS = 5000

function codedError (code: ErrorCode, message?: string): Error & { code: string } {
  const Ctor = Errors[code]
  // No argument for messages without %s: @fastify/error appends extra arguments.
  return (message === undefined ? new Ctor() : new Ctor(message)) as Error & { code: string }
}

function bearer (header: unknown): string | undefined {
  if (typeof header !== 'string') return undefined
  const match = /^Bearer\s+(\S+)\s*$/i.exec(header)
  return match?.[1]
}

/** Validates erp-auth's options as registering it does, without registering it; throws naming the option. */
export const checkAuthOptions = (raw: unknown) => parseOptions('erp-auth', optionsSchema, raw)

async function erpAuth (fastify: FastifyInstance, rawOptions: ErpAuthOptions) {
  const { secret, prisma, tokenTtlSeconds, membershipRecheckMs } = checkAuthOptions(rawOptions)
  refuseTakenDecorators(fastify, 'erp-auth', ['erpAuth', 'authenticate'])

  await fastify.register(fastifyJwt, {
    secret,
    sign: { algorithm: 'HS256', expiresIn: `${tokenTtlSeconds}s` },
    // Pinning the algorithm refuses alg:none and key-confusion tokens.
    verify: { algorithms: ['HS256'] }
  })

  const verify = (token: string): Required<TokenClaims> => {
    let decoded: unknown
    try {
      decoded = fastify.jwt.verify(token)
    } catch (err) {
      const code = (err as { code?: string }).code
      if (code === 'FAST_JWT_EXPIRED') throw codedError('AUTH_TOKEN_EXPIRED')
      throw codedError('AUTH_INVALID_TOKEN', (err as Error).message)
    }
    const claims = claimsSchema.safeParse(decoded)
    if (!claims.success) throw codedError('AUTH_INVALID_TOKEN', 'claims sub, companyId, role, iat and exp are required')
    return claims.data
  }

  // Runs on every request and handshake: concurrent checks share one indexed query. It also
  // reads the heads of the caller's two streams, which erp-offline-queue needs before a socket
  // joins them (one query per storm turn instead of two).
  interface Lookup { role: Role, heads: ReadonlyMap<string, number> }
  const lookups = batchPerTurn<{ userId: string, companyId: string }, Lookup | null>(async (keys) => {
    const companyStreams = keys.map(k => companyStream(k.companyId))
    const userStreams = keys.map(k => userStream(k.userId))
    const rows = await prisma.$queryRaw<Array<{ i: bigint | number, role: Role, companyHead: number | null, userHead: number | null }>>`
      SELECT k.i, m.role::text AS role, ch.seq AS "companyHead", uh.seq AS "userHead"
      FROM unnest(${keys.map(k => k.userId)}::text[], ${keys.map(k => k.companyId)}::text[], ${companyStreams}::text[], ${userStreams}::text[])
        WITH ORDINALITY AS k("userId", "companyId", "companyStream", "userStream", i)
      JOIN memberships m ON m."userId" = k."userId" AND m."companyId" = k."companyId"
      JOIN users u ON u.id = m."userId" AND u.active
      LEFT JOIN stream_heads ch ON ch.stream = k."companyStream"
      LEFT JOIN stream_heads uh ON uh.stream = k."userStream"`
    const found = new Map(rows.map(row => [Number(row.i) - 1, row]))
    return keys.map((_, i) => {
      const row = found.get(i)
      if (!row) return null
      return { role: row.role, heads: new Map([[companyStreams[i]!, Number(row.companyHead ?? 0)], [userStreams[i]!, Number(row.userHead ?? 0)]]) }
    })
  })

  // `db` lets a caller inside a transaction check on its own connection: taking a second pooled
  // connection while holding one can starve the pool under load.
  const membership = async (userId: string, companyId: string, db?: Pick<PrismaClient, '$queryRaw'>): Promise<Role | null> => {
    if (!db) return (await lookups({ userId, companyId }))?.role ?? null
    const rows = await db.$queryRaw<Array<{ role: Role }>>`
      SELECT m.role::text AS role FROM memberships m JOIN users u ON u.id = m."userId"
      WHERE m."userId" = ${userId} AND m."companyId" = ${companyId} AND u.active`
    return rows[0]?.role ?? null
  }

  const check = async (token: string): Promise<{ user: AuthUser, heads: ReadonlyMap<string, number> }> => {
    const claims = verify(token)
    const found = await lookups({ userId: claims.sub, companyId: claims.companyId })
    if (!found) throw codedError('AUTH_NOT_A_MEMBER')
    return { user: { userId: claims.sub, companyId: claims.companyId, role: found.role, exp: claims.exp }, heads: found.heads }
  }
  const authenticate = async (token: string): Promise<AuthUser> => (await check(token)).user

  /** Stream heads read with each accepted handshake's membership check, until taken. */
  const handshakeHeads = new WeakMap<object, ReadonlyMap<string, number>>()

  // Requests of 'in-write' routes whose membership has not been checked yet.
  const unchecked = new WeakSet<FastifyRequest>()
  const GUARD_ERRORS: Record<string, (message: string) => Error> = {
    ERPNM: () => codedError('AUTH_NOT_A_MEMBER'),
    ERPFB: (role) => codedError('FORBIDDEN', role)
  }
  const guardError = (err: unknown): Error | undefined => {
    const raised = sqlErrorOf(err)
    return raised && GUARD_ERRORS[raised.code]?.(raised.message)
  }
  /** The membership passed: the stored role replaces the claimed one. */
  const confirm = (request: FastifyRequest, role: Role): void => {
    request.user.role = role
    unchecked.delete(request)
  }
  const writeGuard = (request: FastifyRequest, roles?: readonly Role[]): WriteGuard => {
    const user = request.user
    if (!user) throw new Error('erp-auth: writeGuard() needs a request that went through fastify.authenticate')
    return {
      sql: Prisma.sql`"public".erp_require_member(${user.userId}, ${user.companyId}, ${roles ? [...roles] : null}::text[])`,
      passed: (role) => confirm(request, role as Role),
      error: guardError
    }
  }
  const checkMembership = async (request: FastifyRequest): Promise<void> => {
    if (!unchecked.has(request)) return
    const role = await membership(request.user.userId, request.user.companyId)
    if (!role) throw codedError('AUTH_NOT_A_MEMBER')
    confirm(request, role)
  }

  const decorator: ErpAuthDecorator = {
    sign: (claims) => fastify.jwt.sign({ sub: claims.sub, companyId: claims.companyId, role: claims.role }),
    verify,
    membership,
    authenticate,
    takeHandshakeHeads (socket) {
      const heads = handshakeHeads.get(socket)
      handshakeHeads.delete(socket)
      return heads
    },
    writeGuard,
    checkMembership,
    recheck: (userId) => recheck(userId),
    confirmSocket: (socket) => confirmSocket(socket)
  }
  fastify.decorate('erpAuth', decorator)
  fastify.decorate('authenticate', async function (request: FastifyRequest) {
    const token = bearer(request.headers.authorization)
    if (!token) throw new Errors.AUTH_MISSING_TOKEN()
    if (request.routeOptions.config.erpAuth?.membership !== 'in-write') {
      request.user = await authenticate(token)
      return
    }
    const claims = verify(token)
    request.user = { userId: claims.sub, companyId: claims.companyId, role: claims.role, exp: claims.exp }
    unchecked.add(request)
  })

  // 'in-write' routes: the value is checked at registration, and a success answered without a
  // passed guard (a handler that forgot it) becomes a 500 instead of going out unchecked.
  async function refuseUnchecked (request: FastifyRequest, reply: FastifyReply) {
    if (unchecked.has(request) && reply.statusCode < 400) {
      unchecked.delete(request)
      fastify.log.error({ url: request.url }, 'erp-auth: in-write route answered without eventLog.commit({ guard: fastify.erpAuth.writeGuard(request) })')
      throw new Errors.AUTH_MEMBERSHIP_UNCHECKED()
    }
  }
  fastify.addHook('onRoute', (route: RouteOptions) => {
    const membership = route.config?.erpAuth?.membership
    if (membership === undefined || membership === 'before') return
    if (membership !== 'in-write') throw new Error(`erp-auth: ${route.method} ${route.url}: config.erpAuth.membership must be 'before' or 'in-write', got ${JSON.stringify(membership)}`)
    route.onSend = [...hookList(route.onSend), refuseUnchecked]
  })

  // ---- Socket.IO handshake ----
  const io = fastify.io
  io.use((socket, next) => {
    const refuse = (code: ErrorCode, message?: string) => {
      const err = codedError(code, message) as ExtendedError
      err.data = { code, message: err.message }
      next(err)
    }
    const { headers, query, auth } = socket.handshake
    if (!fastify.erpSocket.originAllowed(headers.origin, headers.host)) {
      return refuse('AUTH_ORIGIN_REFUSED', headers.origin)
    }
    // Query strings end up in proxy and access logs: a token there is refused, not used.
    if (query.token !== undefined || query.access_token !== undefined) {
      return refuse('AUTH_INVALID_TOKEN', 'tokens in the query string are refused; send auth: { token }')
    }
    const token = typeof auth?.token === 'string' && auth.token !== '' ? auth.token : bearer(headers.authorization)
    if (!token) return refuse('AUTH_MISSING_TOKEN')
    handshakeGeneration.set(socket, recheckGeneration)
    const started = performance.now()
    check(token).then(({ user, heads }) => {
      passedCheck(socket, started)
      // The membership query can outlast the token: refuse it here rather than connect a socket
      // that is already due to be cut.
      if (user.exp * 1000 <= Date.now()) return refuse('AUTH_TOKEN_EXPIRED')
      handshakeHeads.set(socket, heads)
      // The socket keeps who it is (socket.data), not the credential: no bearer token lingers
      // on a long-lived object (or in whatever logs or inspects handshakes), and ~300 bytes less
      // per connection.
      if (typeof auth?.token === 'string') delete auth.token
      if (headers.authorization !== undefined) delete headers.authorization
      socket.data.userId = user.userId
      socket.data.companyId = user.companyId
      socket.data.role = user.role
      socket.data.exp = user.exp
      next()
    }, (err: Error & { code?: string }) => {
      if (err.code && err.code in Errors) return refuse(err.code as ErrorCode, err.message)
      fastify.log.error({ err }, 'erp-auth: handshake check failed')
      const failure = new Error('Authentication unavailable') as ExtendedError
      failure.data = { code: 'SERVICE_UNAVAILABLE', message: failure.message }
      next(failure)
    })
  })

  // Per-socket state lives in maps and shared functions (no closures per connection): a node
  // holds tens of thousands of sockets.
  const expiryTimers = new Map<string, NodeJS.Timeout>()
  // Always through the timer, even when already due: a socket cut inside the connection event
  // would reach the plugins registered after this one already disconnected, and erp-presence
  // would then record a user whose disconnect never comes (a permanent "online").
  const armExpiry = (socket: ErpSocket): void => {
    clearTimeout(expiryTimers.get(socket.id))
    const remaining = socket.data.exp * 1000 - Date.now()
    // Longer expiries than the timers' bound are re-armed when reached.
    const timer = setTimeout(expireIfDue, Math.max(0, Math.min(remaining, MAX_TIMER_MS)), socket)
    timer.unref()
    expiryTimers.set(socket.id, timer)
  }
  const expireIfDue = (socket: ErpSocket): void => {
    if (socket.data.exp * 1000 > Date.now()) return armExpiry(socket)
    expiryTimers.delete(socket.id)
    socket.emit('auth:expired', { message: 'Token expired; reconnect with a new token' })
    socket.disconnect()
  }
  function onDisconnect (this: ErpSocket) {
    clearTimeout(expiryTimers.get(this.id))
    expiryTimers.delete(this.id)
  }

  // ---- membership while connected ----
  const revoke = (socket: ErpSocket): void => {
    if (!socket.connected) return
    socket.emit('auth:revoked', { code: 'AUTH_NOT_A_MEMBER', message: 'No longer an active member of this company; this connection is closed' })
    socket.disconnect()
  }
  // When each socket's membership last passed a check (when that check's query started;
  // performance.now(), which a wall-clock step cannot move), and when a re-check was last asked
  // for it. A re-check may be the answer to a membership just removed: from the moment it is
  // asked for, confirmSocket trusts no earlier check, and a check that started before it (still
  // in flight) does not count once it passes.
  const checkedAt = new WeakMap<ErpSocket, number>()
  const recheckAskedAt = new WeakMap<ErpSocket, number>()
  const passedCheck = (socket: ErpSocket, started: number): void => {
    if (started > (recheckAskedAt.get(socket) ?? -Infinity)) checkedAt.set(socket, started)
  }
  /** Re-checks the given sockets, a slice per query; returns how many were cut. */
  const recheckSockets = async (list: ErpSocket[]): Promise<number> => {
    const asked = performance.now()
    for (const socket of list) {
      checkedAt.delete(socket)
      recheckAskedAt.set(socket, asked)
    }
    let cut = 0
    for (let i = 0; i < list.length; i += RECHECK_SLICE) {
      const slice = list.slice(i, i + RECHECK_SLICE).filter(socket => socket.connected)
      const started = performance.now()
      const found = await Promise.all(slice.map(socket => lookups({ userId: socket.data.userId, companyId: socket.data.companyId })))
      slice.forEach((socket, j) => {
        const role = found[j]?.role
        if (role) {
          socket.data.role = role
          passedCheck(socket, started)
        } else if (socket.connected) {
          revoke(socket)
          cut++
        }
      })
    }
    return cut
  }
  const confirmSocket = async (socket: ErpSocket): Promise<boolean> => {
    const checked = checkedAt.get(socket)
    if (checked !== undefined && performance.now() - checked < MEMBERSHIP_FRESH_MS) return socket.connected
    await recheckSockets([socket])
    return socket.connected
  }
  /** This node's sockets (of one user, or all). */
  const localSockets = (userId?: string): ErpSocket[] => {
    const sockets = io.of('/').sockets
    const ids = userId === undefined ? sockets.keys() : (io.of('/').adapter.rooms.get(userStream(userId)) ?? [])
    return [...ids].map(id => sockets.get(id)).filter(socket => socket !== undefined)
  }
  // A re-check asked for between a handshake's membership query and its connection event did
  // not see that socket: the handshake notes the re-check count it started with, and a socket
  // that connects after another re-check is checked again.
  let recheckGeneration = 0
  const handshakeGeneration = new WeakMap<object, number>()
  const recheckLocal = (userId?: string): Promise<number> => {
    recheckGeneration++
    return recheckSockets(localSockets(userId))
  }
  const onRecheckRequest = (userId: unknown) => {
    if (userId !== null && typeof userId !== 'string') {
      fastify.log.warn({ userId }, 'erp-auth: ignored a malformed membership re-check request from another node')
      return
    }
    recheckLocal(userId ?? undefined).catch(err => fastify.log.warn({ err }, 'erp-auth: membership re-check failed'))
  }
  const recheck = async (userId?: string): Promise<number> => {
    fastify.erpSocket.toOtherNodes('erp:recheck', userId ?? null)
    return recheckLocal(userId)
  }
  io.on('erp:recheck', onRecheckRequest)
  every(fastify, membershipRecheckMs, 'erp-auth: membership re-check', () => recheckSockets(localSockets()))

  const onRefresh = listener('auth:refresh', authRefreshSchema, async (socket, { token }) => {
    let claims: Required<TokenClaims>
    try {
      claims = verify(token)
    } catch (err) {
      const e = err as Error & { code: string }
      throw new SocketError(e.code, e.message)
    }
    if (claims.sub !== socket.data.userId || claims.companyId !== socket.data.companyId) {
      throw new SocketError('AUTH_INVALID_TOKEN', 'Refresh token must be for the same user and company')
    }
    const olderThanCurrent = () => claims.exp < socket.data.exp
    if (olderThanCurrent()) throw new SocketError('AUTH_INVALID_TOKEN', 'Refresh token expires before the current one')
    const role = await membership(claims.sub, claims.companyId)
    if (!role) {
      // The membership is gone: this socket's own is too. Cut it once the refusal is acked.
      setImmediate(revoke, socket)
      throw new SocketError('AUTH_NOT_A_MEMBER', codedError('AUTH_NOT_A_MEMBER').message)
    }
    // Again: a refresh with a later token may have been applied while this one's check ran.
    if (olderThanCurrent()) throw new SocketError('AUTH_INVALID_TOKEN', 'Refresh token expires before the current one')
    socket.data.exp = claims.exp
    socket.data.role = role
    if (socket.connected) armExpiry(socket)
    return { exp: claims.exp }
  }, err => fastify.log.error({ err }, 'erp-auth: auth:refresh failed'))

  io.on('connection', (socket: ErpSocket) => {
    socket.join([companyStream(socket.data.companyId), userStream(socket.data.userId)])
    armExpiry(socket)
    socket.on('disconnect', onDisconnect)
    socket.on('auth:refresh', onRefresh)
    const generation = handshakeGeneration.get(socket)
    handshakeGeneration.delete(socket)
    if (generation !== recheckGeneration) {
      recheckSockets([socket]).catch(err => fastify.log.warn({ err }, 'erp-auth: membership re-check failed'))
    }
  })
  fastify.addHook('onClose', async () => {
    io.off('erp:recheck', onRecheckRequest)
    for (const timer of expiryTimers.values()) clearTimeout(timer)
    expiryTimers.clear()
  })
}

export default fp(erpAuth, { fastify: '5.x', name: 'erp-auth', dependencies: ['erp-socket'] })
