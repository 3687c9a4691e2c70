import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { z } from 'zod'
import type { PrismaClient } from '../src/generated/prisma/client.ts'
import erpSocket, { checkSocketOptions, type ErpSocketOptions } from './socket/index.ts'
import erpAuth, { checkAuthOptions, type ErpAuthOptions } from './auth/index.ts'
import erpOfflineQueue, { checkOfflineQueueOptions, type ErpOfflineQueueOptions } from './offline-queue/index.ts'
import erpConflicts, { checkConflictsOptions, type ErpConflictsOptions } from './conflict-resolution/index.ts'
import erpHealth, { checkHealthOptions, type ErpHealthOptions } from './health/index.ts'
import erpPresence, { checkPresenceOptions, refuseMemoryOnRedis, type ErpPresenceOptions } from './presence/index.ts'
import erpIdempotency, { checkIdempotencyOptions, type ErpIdempotencyOptions } from './idempotency/index.ts'
import { parseOptions } from './support.ts'

export { erpSocket, erpAuth, erpOfflineQueue, erpConflicts, erpHealth }
export { erpIdempotency }
export { erpPresence }
export { Errors, erpErrorHandler } from './errors.ts'
export type * from './events.ts'
export { companyStream, userStream } from './events.ts'
// What an app's own routes and stores are typed with.
export type { ErpSocketOptions, ErpServer, RedisClients } from './socket/index.ts'
export type { ErpAuthOptions, AuthUser, TokenClaims, ErpAuthDecorator } from './auth/index.ts'
export type { ErpOfflineQueueOptions, EventLog, Publish, PublishInput, StatementChange, TransactionOptions, Tx, WriteGuard } from './offline-queue/index.ts'
export type { ErpConflictsOptions, Conflicts, ConflictContext, ConflictResolver, ConflictStrategy, VersionedUpdate } from './conflict-resolution/index.ts'
export type { ErpIdempotencyOptions } from './idempotency/index.ts'
export type { ErpHealthOptions, WebsocketHealth } from './health/index.ts'
export type { ErpPresenceOptions, ErpPresenceDecorator } from './presence/index.ts'
export type { PresenceStore } from './presence/store.ts'
export { PartialSweepError } from './presence/store.ts'
export { MemoryPresenceStore } from './presence/memory-store.ts'
export { RedisPresenceStore, type RedisPresenceStoreOptions } from './presence/redis-store.ts'
export { SocketError } from './socket/handle.ts'
export { checkSocketOptions, checkAuthOptions, checkPresenceOptions, checkOfflineQueueOptions, checkConflictsOptions, checkIdempotencyOptions, checkHealthOptions }

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
  /** Presence (erp-presence): store, grace period, heartbeat and TTL. Default store: memory on one node, the adapter's Redis with `socket.redis`. */
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
  const sections = {
    socket: options.socket ?? {},
    auth: { ...options.auth, prisma, secret: jwtSecret },
    presence: options.presence ?? {},
    eventLog: { ...options.eventLog, prisma },
    conflicts: { ...options.conflicts, prisma },
    idempotency: { ...options.idempotency, prisma },
    health: { ...options.health, prisma }
  }
  // Every section is checked before erp-socket opens its Redis connections: a bad option further
  // down leaves nothing open for the caller to close.
  try {
    checkSocketOptions(sections.socket)
    checkAuthOptions(sections.auth)
    checkPresenceOptions(sections.presence)
    refuseMemoryOnRedis(sections.presence.store, sections.socket.redis !== undefined)
    checkOfflineQueueOptions(sections.eventLog)
    checkConflictsOptions(sections.conflicts)
    checkIdempotencyOptions(sections.idempotency)
    checkHealthOptions(sections.health)
  } catch (err) {
    // erp-auth's `secret` is the umbrella's `jwtSecret`.
    if (err instanceof Error) err.message = err.message.replace(/^erp-auth: invalid option secret:/, 'erp-realtime: invalid option jwtSecret:')
    throw err
  }
  await fastify.register(erpSocket, sections.socket)
  await fastify.register(erpAuth, sections.auth)
  await fastify.register(erpPresence, sections.presence)
  await fastify.register(erpOfflineQueue, sections.eventLog)
  await fastify.register(erpConflicts, sections.conflicts)
  await fastify.register(erpIdempotency, sections.idempotency)
  await fastify.register(erpHealth, sections.health)
}

/** Registers erp-socket, erp-auth, erp-presence, erp-offline-queue, erp-conflicts, erp-idempotency and erp-health. */
export default fp(erpRealtime, { fastify: '5.x', name: 'erp-realtime' })
