import type { FastifyInstance, FastifyRequest } from 'fastify'
import rateLimit from '@fastify/rate-limit'
import { z } from 'zod'
import { Errors } from '../../plugins/errors.ts'
import { verifyPassword } from '../passwords.ts'
import { parse, rowId } from './common.ts'

const loginBody = z.object({
  email: z.string().trim().toLowerCase().email().max(320),
  password: z.string().min(1).max(1024),
  companyId: rowId.optional()
}).strict()

// Verified against when the email is unknown, so a miss costs the same time as a wrong password.
const DUMMY_HASH = 'scrypt$32768$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA='

export interface AuthRoutesOptions {
  /**
   * Login attempts per minute from one client address, whatever the email and whether the body
   * is valid (0: no limit). Past it the route answers 429 RATE_LIMITED (with Retry-After)
   * without checking the password: guessing is slowed, and one address can neither try many
   * accounts nor keep the password hashing busy. Counted per node; behind a proxy the address
   * comes from X-Forwarded-For only with TRUST_PROXY. Keyed by address alone: with the email in
   * the key, cheap requests with new emails pushed a guessed account's counter out of the
   * limiter's store (5,000 keys).
   */
  loginAttemptsPerMinute?: number
}

export async function authRoutes (fastify: FastifyInstance, { loginAttemptsPerMinute = 20 }: AuthRoutesOptions = {}) {
  await fastify.register(rateLimit, {
    global: false,
    errorResponseBuilder: (_request, context) => new Errors.RATE_LIMITED(context.after)
  })
  const rateLimitConfig = loginAttemptsPerMinute > 0 && {
    max: loginAttemptsPerMinute,
    timeWindow: 60_000,
    keyGenerator: (request: FastifyRequest) => request.ip
  }
  fastify.post('/auth/login', { config: { rateLimit: rateLimitConfig } }, async (request) => {
    const { email, password, companyId } = parse(loginBody, request.body)
    const user = await fastify.prisma.user.findUnique({
      where: { email },
      include: { memberships: { include: { company: { select: { id: true, name: true } } }, orderBy: { createdAt: 'asc' } } }
    })
    const ok = await verifyPassword(password, user?.passwordHash ?? DUMMY_HASH)
    if (!user || !ok || !user.active) throw new Errors.AUTH_INVALID_CREDENTIALS()
    const memberships = companyId ? user.memberships.filter(m => m.companyId === companyId) : user.memberships
    if (memberships.length === 0) throw new Errors.AUTH_NOT_A_MEMBER()
    if (memberships.length > 1) {
      const err = new Errors.VALIDATION_FAILED('companyId is required: this user belongs to several companies') as Error & { body?: unknown }
      err.body = { companies: memberships.map(m => ({ id: m.company.id, name: m.company.name, role: m.role })) }
      throw err
    }
    const membership = memberships[0]!
    const token = fastify.erpAuth.sign({ sub: user.id, companyId: membership.companyId, role: membership.role })
    const { exp } = fastify.erpAuth.verify(token)
    return {
      token,
      expiresAt: new Date(exp * 1000).toISOString(),
      user: { id: user.id, email: user.email, name: user.name },
      company: membership.company,
      role: membership.role
    }
  })

  fastify.get('/auth/me', { preHandler: fastify.authenticate }, async (request) => {
    const { userId, companyId, role, exp } = request.user
    return { userId, companyId, role, expiresAt: new Date(exp * 1000).toISOString() }
  })
}
