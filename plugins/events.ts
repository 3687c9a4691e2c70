/**
 * The one shared events module: Socket.IO event maps for `fastify.io`, with the zod schemas
 * that validate every client→server payload beside their types.
 *
 * Apps add domain events by declaration merging, in a module of their own (path relative to it):
 *
 *   export {}
 *   declare module './plugins/events.ts' {
 *     interface DomainEventMap { 'invoice:paid': { invoiceId: string } }
 *   }
 */
import { z } from 'zod'

export const ROLES = ['admin', 'manager', 'member'] as const
export type Role = (typeof ROLES)[number]

/** Streams are `company:<id>` or `user:<id>`; each is also the Socket.IO room of that name. */
export type Stream = `company:${string}` | `user:${string}`
export const companyStream = (companyId: string): Stream => `company:${companyId}`
export const userStream = (userId: string): Stream => `user:${userId}`

/** The envelope every server→client domain event shares. */
export interface Envelope<T = unknown, K extends string = string> {
  /** Unique across streams. */
  id: string
  stream: Stream
  /** Position in the stream: contiguous, n+1 follows n. */
  seq: number
  type: K
  companyId: string
  /**
   * ISO-8601 time the event was recorded, inside its transaction (not the commit): it grows
   * with `seq` within a stream.
   */
  at: string
  actor: { userId: string | null }
  data: T
}

/** Domain event payloads (`envelope.data`) by event type. Extend by declaration merging. */
export interface DomainEventMap {
  'project:created': { project: Record<string, unknown> }
  'project:updated': { project: Record<string, unknown>, changed: string[], merged?: boolean }
  /**
   * `detachedExpenses`: the project's expenses, whose `projectId` the delete set to null (each an
   * update: version + 1), with their new versions, at most 1,000 (`[]` when it had none);
   * `detachedExpenseCount`: how many there were (more than listed: refetch the company's
   * expenses). Always sent by `DELETE /projects/:id`; absent only from events recorded before.
   */
  'project:deleted': { projectId: string, detachedExpenses?: Array<{ id: string, version: number }>, detachedExpenseCount?: number }
  'expense:submitted': { expense: Record<string, unknown> }
  'expense:approved': { expense: Record<string, unknown> }
  'expense:rejected': { expense: Record<string, unknown> }
  'stock:updated': { item: Record<string, unknown>, delta?: number, reason?: string, movementId?: string }
  'stock:low': { item: Record<string, unknown>, reorderLevel: number }
  'notification:new': { kind: string, message: string, ref?: { type: string, id: string } }
  'conflict:detected': { entity: string, entityId: string, fields: string[], resolution: string }
}
export type DomainEventType = keyof DomainEventMap & string

export interface ErrorAck { ok: false, error: { code: string, message: string } }
export type AckResult<T extends object = object> = ({ ok: true } & T) | ErrorAck
export type Ack<T extends object = object> = (result: AckResult<T>) => void

export type PresenceStatus = 'online' | 'away' | 'busy' | 'offline'
export interface Viewing { type: string, id: string }
export interface PresenceEntry {
  userId: string
  status: Exclude<PresenceStatus, 'offline'>
  devices: number
  viewing?: Viewing
  since: string
  /** The user's presence revision: apply a later `presence:changed` only if its rev is higher. */
  rev: number
}
export interface PresenceChanged {
  userId: string
  status: PresenceStatus
  devices: number
  viewing?: Viewing
  at: string
  /**
   * The user's presence revision (per company), higher for every later state, also across offline
   * and back. Announcements from different nodes can arrive out of order: drop one whose rev is
   * not newer than the last you applied for that user.
   */
  rev: number
}

export interface ResumeStreamResult { recovered: boolean, replayed: number, headSeq: number }

type DomainEmitters = { [K in DomainEventType]: (envelope: Envelope<DomainEventMap[K], K>) => void }

export interface ServerToClientEvents extends DomainEmitters {
  'sync:head': (head: { stream: Stream, seq: number }) => void
  'presence:changed': (change: PresenceChanged) => void
  'auth:expired': (info: { message: string }) => void
  /** The user lost the membership (removed, deactivated) while connected; the server then disconnects. */
  'auth:revoked': (info: { code: 'AUTH_NOT_A_MEMBER', message: string }) => void
  /** Sent before a node closes the connection on shutdown; the client reconnects and resumes. */
  'server:shutdown': (info: { message: string }) => void
}

// ---- client → server payloads: schema first, type inferred from it ----

const id = z.string().min(1).max(128)
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/
const wellFormed = (schema: z.ZodString) => schema.refine(value => !LONE_SURROGATE.test(value), 'must be well-formed Unicode (no lone surrogate)')
/**
 * A string PostgreSQL stores as sent: no NUL (text and jsonb cannot hold it) and no lone
 * surrogate (jsonb refuses it, text silently turns it into U+FFFD). For request fields that
 * reach the database.
 */
export const storable = (schema: z.ZodString) => wellFormed(schema).refine(value => !value.includes('\u0000'), 'must not contain NUL (\\u0000)')

export const syncResumeSchema = z.object({
  streams: z.record(
    z.string().max(200).regex(/^(company|user):[^:\s]+$/, 'must be company:<id> or user:<id>'),
    z.number().int().min(0).max(Number.MAX_SAFE_INTEGER)
  ).refine(streams => Object.keys(streams).length > 0 && Object.keys(streams).length <= 10, 'must name 1 to 10 streams')
}).strict()
export type SyncResume = z.infer<typeof syncResumeSchema>

export const presenceSetSchema = z.object({
  status: z.enum(['online', 'away', 'busy']),
  // Well-formed Unicode: the Redis store's Lua (cjson) refuses a lone surrogate, which would turn
  // a bad payload into a retryable SERVICE_UNAVAILABLE.
  viewing: z.object({ type: wellFormed(z.string().min(1).max(64)), id: wellFormed(id) }).strict().nullable().optional()
}).strict()
export type PresenceSet = z.infer<typeof presenceSetSchema>

export const authRefreshSchema = z.object({ token: z.string().min(1).max(8192) }).strict()
export type AuthRefresh = z.infer<typeof authRefreshSchema>

export interface ClientToServerEvents {
  'sync:resume': (request: SyncResume, ack: Ack<{ streams: Record<string, ResumeStreamResult> }>) => void
  'presence:set': (request: PresenceSet, ack: Ack) => void
  'presence:list': (ack: Ack<{ users: PresenceEntry[] }>) => void
  'auth:refresh': (request: AuthRefresh, ack: Ack<{ exp: number }>) => void
}

/** Events between nodes (through the Redis adapter's serverSideEmit). */
export interface InterServerEvents {
  'erp:events': (envelopes: Envelope[]) => void
  'erp:presence': (change: { companyId: string, change: PresenceChanged }) => void
  /** Re-check the memberships of one user's sockets (or all, with null): `erpAuth.recheck`. */
  'erp:recheck': (userId: string | null) => void
}

/** What the handshake leaves on `socket.data`. */
export interface SocketData {
  userId: string
  companyId: string
  role: Role
  /** Token expiry, seconds since the epoch. */
  exp: number
}
