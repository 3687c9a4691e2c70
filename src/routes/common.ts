import type { FastifyRequest } from 'fastify'
import { z, type ZodType } from 'zod'
import { Errors, validationError } from '../../plugins/errors.ts'
import { storable, type Role } from '../../plugins/events.ts'
import { ifMatchVersion } from '../../plugins/support.ts'

/** Parses request input with a zod schema; failures become 400 VALIDATION_FAILED. */
export function parse<T> (schema: ZodType<T>, value: unknown): T {
  const result = schema.safeParse(value ?? {})
  if (!result.success) throw validationError(result.error)
  return result.data
}

/** A row id (path parameter or body field). */
export const rowId = storable(z.string().min(1).max(128))

export const idParams = z.object({ id: rowId })

/** A bounded single-line text field. */
export const text = (max: number) => storable(z.string().trim().min(1).max(max))

export const listQuery = z.object({
  limit: z.coerce.number().int().min(1).max(500).default(100),
  offset: z.coerce.number().int().min(0).max(1_000_000).default(0)
})

export function requireRole (request: FastifyRequest, ...roles: Role[]): void {
  if (!roles.includes(request.user.role)) throw new Errors.FORBIDDEN(request.user.role)
}

/**
 * The version the client based its change on: `baseVersion` in the body, or `If-Match`. Both
 * may be sent, but must agree: a stale header must not be overridden by the body.
 */
export function baseVersionOf (request: FastifyRequest, bodyVersion: number | undefined): number {
  const header = request.headers['if-match']
  let headerVersion: number | undefined
  if (typeof header === 'string') {
    const digits = ifMatchVersion(header)
    headerVersion = digits === undefined ? undefined : Number(digits)
    if (headerVersion === undefined || headerVersion < 1 || !Number.isSafeInteger(headerVersion)) {
      throw new Errors.VALIDATION_FAILED('If-Match must be a row version, e.g. "3"')
    }
  }
  if (bodyVersion !== undefined && headerVersion !== undefined && bodyVersion !== headerVersion) {
    throw new Errors.VALIDATION_FAILED(`baseVersion ${bodyVersion} and If-Match ${headerVersion} disagree`)
  }
  const version = bodyVersion ?? headerVersion
  if (version === undefined) throw new Errors.VALIDATION_FAILED('baseVersion (or an If-Match header) is required for updates')
  return version
}
