import { AsyncLocalStorage } from 'node:async_hooks'
import { Prisma } from '../src/generated/prisma/client.ts'
import { Errors } from './errors.ts'
import { sqlErrorOf } from './support.ts'

/**
 * The fence between erp-idempotency and erp-offline-queue. A request that claimed an
 * Idempotency-Key runs its handler inside `heldClaims` (erp-idempotency); every eventLog write
 * it makes then calls `erp_claim_commit` in its own transaction. That marks the claim committed,
 * or refuses the write when a later request has taken the claim over (after `recoverAfterMs`,
 * when the first looked dead). So a change is applied at most once, and a claim left by a
 * crashed request tells whether its change committed.
 */
export interface HeldClaim { companyId: string, userId: string, key: string, token: string }

export const heldClaims = new AsyncLocalStorage<HeldClaim>()

/** Scalar SQL: marks the claim committed; raises SQLSTATE ERPTO when it is no longer this request's. */
export const fenceSql = (c: HeldClaim): Prisma.Sql =>
  Prisma.sql`"public".erp_claim_commit(${c.companyId}, ${c.userId}, ${c.key}, ${c.token})`

/** IDEMPOTENCY_KEY_TAKEN_OVER for the fence's refusal; undefined for any other error. */
export const fenceError = (err: unknown): Error | undefined =>
  sqlErrorOf(err)?.code === 'ERPTO' ? new Errors.IDEMPOTENCY_KEY_TAKEN_OVER() : undefined
