import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { z } from 'zod'
import type { PrismaClient } from '../src/generated/prisma/client.ts'
import erpSocket, { type ErpSocketOptions } from './socket/index.ts'
import erpAuth, { type ErpAuthOptions } from './auth/index.ts'
import erpOfflineQueue, { type ErpOfflineQueueOptions } from './offline-queue/index.ts'
import erpConflicts, { type ErpConflictsOptions } from './conflict-resolution/index.ts'
import erpHealth, { type ErpHealthOptions } from './health/index.ts'
import erpPresence, { type ErpPresenceOptions } from './presence/index.ts'
import erpIdempotency, { type ErpIdempotencyOptions } from './idempotency/index.ts'
import { parseOptions } from './support.ts'

export { erpSocket, erpAuth, erpOfflineQueue, erpConflicts, erpHealth }
export { erpIdempotency }
export { erpPresence }
export { Errors, erpErrorHandler } from './errors.ts'
export type * from './events.ts'

/** One options object for every erp-realtime plugin. */
export interface ErpRealtimeOptions {
  /** Prisma client with the erp-realtime models (prisma/schema.prisma). Required. */
  prisma: PrismaClient
  /** JWT HS256 key, at least 32 characters. Required. */
  jwtSecret: string
  socket?: ErpSocketOptions
  auth?: Omit<ErpAuthOptions, 'prisma' | 'secret'>
  eventLog?: Omit<ErpOfflineQueueOptions, 'prisma'>
  conflicts?: Omit<ErpConflictsOptions, 'prisma'>
  health?: Omit<ErpHealthOptions, 'prisma'>
  /** Presence (erp-presence): store, grace period, heartbeat and TTL. Default: memory store. */
  presence?: ErpPresenceOptions
  /** Idempotency-Key handling for POST/PATCH/PUT routes registered after the umbrella. */
  idempotency?: Omit<ErpIdempotencyOptions, 'prisma'>
}

// The plugins check their own options; here only that no section is misspelled (it would be ignored).
const sectionsSchema = z.object({
  prisma: z.unknown(),
  jwtSecret: z.unknown(),
  socket: z.unknown().optional(),
  auth: z.unknown().optional(),
  eventLog: z.unknown().optional(),
  conflicts: z.unknown().optional(),
  health: z.unknown().optional(),
  presence: z.unknown().optional(),
  idempotency: z.unknown().optional()
}).strict()

async function erpRealtime (fastify: FastifyInstance, options: ErpRealtimeOptions) {
  parseOptions('erp-realtime', sectionsSchema, options)
  const { prisma, jwtSecret } = options
  await fastify.register(erpSocket, options.socket ?? {})
  await fastify.register(erpAuth, { ...options.auth, prisma, secret: jwtSecret })
  await fastify.register(erpPresence, options.presence ?? {})
  await fastify.register(erpOfflineQueue, { ...options.eventLog, prisma })
  await fastify.register(erpConflicts, { ...options.conflicts, prisma })
  await fastify.register(erpIdempotency, { ...options.idempotency, prisma })
  await fastify.register(erpHealth, { ...options.health, prisma })
}

/** Registers erp-socket, erp-auth, erp-presence, erp-offline-queue, erp-conflicts, erp-idempotency and erp-health. */
export default fp(erpRealtime, { fastify: '5.x', name: 'erp-realtime' })
