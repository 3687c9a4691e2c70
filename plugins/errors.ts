import createError, { type FastifyErrorConstructor } from '@fastify/error'
import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify'
import { ZodError } from 'zod'
import { databaseUnreachable, sqlErrorOf } from './support.ts'

/**
 * Stable error codes. HTTP errors are `@fastify/error` constructors; socket errors reuse the
 * same codes in `err.data.code` (handshake) or `{ ok: false, error: { code } }` (acks).
 */
export const Errors = {
  AUTH_MISSING_TOKEN: createError('AUTH_MISSING_TOKEN', 'Authentication token missing', 401),
  AUTH_INVALID_TOKEN: createError('AUTH_INVALID_TOKEN', 'Invalid token: %s', 401),
  AUTH_TOKEN_EXPIRED: createError('AUTH_TOKEN_EXPIRED', 'Token expired', 401),
  AUTH_NOT_A_MEMBER: createError('AUTH_NOT_A_MEMBER', 'User is not an active member of this company', 403),
  AUTH_ORIGIN_REFUSED: createError('AUTH_ORIGIN_REFUSED', 'Origin %s is not allowed', 403),
  AUTH_INVALID_CREDENTIALS: createError('AUTH_INVALID_CREDENTIALS', 'Invalid email or password', 401),
  FORBIDDEN: createError('FORBIDDEN', 'Role %s may not do this', 403),
  AUTH_MEMBERSHIP_UNCHECKED: createError('AUTH_MEMBERSHIP_UNCHECKED', 'The route answered without checking membership', 500),
  CONFLICT_RESOLVER_INVALID: createError('CONFLICT_RESOLVER_INVALID', 'The %s conflict resolver returned fields the update refuses: %s', 500),
  VALIDATION_FAILED: createError('VALIDATION_FAILED', 'Invalid input: %s', 400),
  NOT_FOUND: createError('NOT_FOUND', '%s not found', 404),
  ALREADY_EXISTS: createError('ALREADY_EXISTS', '%s already exists', 409),
  CONFLICT: createError('CONFLICT', 'The %s was changed by someone else', 409),
  INVALID_TRANSITION: createError('INVALID_TRANSITION', 'Cannot %s an expense that is %s', 409),
  INSUFFICIENT_STOCK: createError('INSUFFICIENT_STOCK', 'Adjustment would make the quantity negative (%s)', 409),
  IDEMPOTENCY_KEY_REUSED: createError('IDEMPOTENCY_KEY_REUSED', 'Idempotency-Key was already used with a different request', 422),
  IDEMPOTENCY_KEY_INVALID: createError('IDEMPOTENCY_KEY_INVALID', 'Idempotency-Key must be 1 to 255 visible ASCII characters', 400),
  IDEMPOTENCY_KEY_IN_PROGRESS: createError('IDEMPOTENCY_KEY_IN_PROGRESS', 'A request with this Idempotency-Key is still being processed; retry later', 409),
  IDEMPOTENCY_KEY_RESPONSE_LOST: createError('IDEMPOTENCY_KEY_RESPONSE_LOST', 'The request with this Idempotency-Key ran and its change was applied, but its response was lost (its server stopped, or it failed after the commit); read the current state instead of retrying', 409),
  IDEMPOTENCY_KEY_TAKEN_OVER: createError('IDEMPOTENCY_KEY_TAKEN_OVER', 'A later request with this Idempotency-Key took it over; this one changed nothing', 409),
  RATE_LIMITED: createError('RATE_LIMITED', 'Too many attempts; retry in %s', 429),
  SERVICE_UNAVAILABLE: createError('SERVICE_UNAVAILABLE', '%s', 503)
} satisfies Record<string, FastifyErrorConstructor>

export type ErrorCode = keyof typeof Errors

/** Payload of an error answer: `{ error: { code, message, ...detail } , ...extra }`. */
export interface ErrorBody {
  error: { code: string, message: string, issues?: Array<{ path: string, message: string }> }
  [extra: string]: unknown
}

/** An error that adds top-level fields to its HTTP answer (a 409's `current`/`yours`/`base`). */
export interface ErrorWithBody extends FastifyError {
  body?: Record<string, unknown>
  issues?: Array<{ path: string, message: string }>
}

export function zodIssues (err: ZodError): Array<{ path: string, message: string }> {
  return err.issues.slice(0, 20).map(issue => ({ path: issue.path.join('.'), message: issue.message }))
}

/** Builds a VALIDATION_FAILED error from a ZodError, keeping the first issues for the client. */
export function validationError (err: ZodError): ErrorWithBody {
  return validationFailed(zodIssues(err))
}

/** A VALIDATION_FAILED error naming its issues (the first in the message), as zod's are answered. */
export function validationFailed (issues: Array<{ path: string, message: string }>): ErrorWithBody {
  const first = issues[0]
  const error: ErrorWithBody = new Errors.VALIDATION_FAILED(first ? `${first.path || 'body'}: ${first.message}` : 'malformed')
  error.issues = issues
  return error
}

/** The message of a `SERVICE_UNAVAILABLE` answered because the database cannot be reached (HTTP and acks). */
export const DATABASE_UNREACHABLE = 'Database unreachable; try again'

// character_not_in_repertoire (a NUL in text) and untranslatable_character (`\u0000` in jsonb).
const UNSTORABLE_TEXT = new Set(['22021', '22P05'])

/**
 * Fastify error handler producing the contract's `{ error: { code, message } }` shape.
 * Register it with `fastify.setErrorHandler(erpErrorHandler)` (the app in src/ does). A
 * database that cannot be reached (`databaseUnreachable`) answers 503 `SERVICE_UNAVAILABLE`;
 * text PostgreSQL cannot store (a NUL: SQLSTATE 22021, 22P05) answers 400 `VALIDATION_FAILED`.
 */
export function erpErrorHandler (this: unknown, err: ErrorWithBody | ZodError, request: FastifyRequest, reply: FastifyReply): void {
  if (err instanceof ZodError) err = validationError(err)
  // A lost or refused database connection is an outage to retry, not a bug: 503, and the
  // original error is logged with it.
  if ((err.statusCode === undefined || err.statusCode >= 500) && databaseUnreachable(err)) {
    request.log.error({ err }, 'request failed: database unreachable')
    const unavailable = new Errors.SERVICE_UNAVAILABLE(DATABASE_UNREACHABLE)
    reply.status(503).send({ error: { code: unavailable.code, message: unavailable.message } })
    return
  }
  // Text PostgreSQL cannot store (a NUL) that got past the route's schema: the input's fault, and
  // the same request always fails the same way (a 400 an Idempotency-Key may keep). Other data
  // exceptions (division by zero, a number out of range) stay 500: they may be the server's bug.
  if (err.statusCode === undefined && UNSTORABLE_TEXT.has(sqlErrorOf(err)?.code ?? '')) {
    request.log.warn({ err }, 'request failed: text the database cannot store')
    const invalid = new Errors.VALIDATION_FAILED('text contains a character the database cannot store (NUL, \\u0000)')
    reply.status(400).send({ error: { code: invalid.code, message: invalid.message } })
    return
  }
  const status = err.statusCode ?? 500
  if (status >= 500) {
    request.log.error({ err }, 'request failed')
    reply.status(status).send({ error: { code: status === 503 ? err.code : 'INTERNAL', message: status === 503 ? err.message : 'Internal server error' } })
    return
  }
  // Fastify's own client errors (bad JSON, body too large, wrong content type) keep their status and code.
  const code = err.validation ? 'VALIDATION_FAILED' : (err.code ?? 'BAD_REQUEST')
  const body: ErrorBody = { error: { code, message: err.message } }
  if (err.issues) body.error.issues = err.issues
  if (err.body) Object.assign(body, err.body)
  reply.status(status).send(body)
}
