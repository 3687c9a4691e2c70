import type { Viewing } from '../events.ts'
import { sameViewing, type Change, type Departure, type Expired, type Offline, type PresenceStore, type SocketRef, type Transition, type UserPresence } from './store.ts'

interface Deadline {
  companyId: string
  userId: string
  /** undefined for a grace period. */
  socketId?: string
  at: number
}

const socketKey = (ref: SocketRef) => ref.socketId
const graceKey = (companyId: string, userId: string) => `grace\u0000${companyId}\u0000${userId}`

/**
 * Presence in this process: the single-node default. Several app instances in one process
 * may share one instance (it then behaves like the Redis store does across nodes).
 */
export class MemoryPresenceStore implements PresenceStore {
  readonly kind = 'memory'
  private readonly users = new Map<string, Map<string, UserPresence>>()
  private readonly sockets = new Map<string, string>()
  /** Socket expiries and grace deadlines; swept by scanning (a sweep is O(entries) in memory). */
  private readonly deadlines = new Map<string, Deadline>()
  /**
   * Per-company revision counters. Kept when a company empties (one number per company), so a
   * user who goes offline and comes back gets a higher rev than any announcement before.
   */
  private readonly revs = new Map<string, number>()

  constructor (private readonly clock: () => number = Date.now) {}

  private company (companyId: string): Map<string, UserPresence> {
    let users = this.users.get(companyId)
    if (!users) this.users.set(companyId, users = new Map())
    return users
  }

  // At least the clock in ms, as in the Redis store (where it survives a data loss; here it
  // keeps both stores' revs alike).
  private nextRev (companyId: string): number {
    const rev = Math.max((this.revs.get(companyId) ?? 0) + 1, this.clock())
    this.revs.set(companyId, rev)
    return rev
  }

  private drop (companyId: string, userId: string): void {
    const users = this.users.get(companyId)
    users?.delete(userId)
    if (users?.size === 0) this.users.delete(companyId)
  }

  async connect (ref: SocketRef, ttlMs: number): Promise<Transition> {
    const now = this.clock()
    const users = this.company(ref.companyId)
    const current = users.get(ref.userId)
    const before = current ? { ...current } : null
    const after: UserPresence = current ? { ...current } : { status: 'online', devices: 0, since: now, rev: 0 }
    if (!this.sockets.has(ref.socketId)) {
      this.sockets.set(ref.socketId, ref.userId)
      after.devices++
    }
    after.rev = this.nextRev(ref.companyId)
    users.set(ref.userId, after)
    this.deadlines.set(socketKey(ref), { ...ref, at: now + ttlMs })
    this.deadlines.delete(graceKey(ref.companyId, ref.userId))
    return { before, after: { ...after } }
  }

  // In memory nothing is lost while the process lives: no epoch, and the epoch arguments are unused.
  async disconnect (ref: SocketRef, graceMs: number): Promise<Departure | null> {
    this.deadlines.delete(socketKey(ref))
    if (!this.sockets.delete(ref.socketId)) return null
    const current = this.users.get(ref.companyId)?.get(ref.userId)
    if (!current) return null
    current.devices = Math.max(0, current.devices - 1)
    current.rev = this.nextRev(ref.companyId)
    if (current.devices > 0) return { after: { ...current } }
    const graceUntil = this.clock() + graceMs
    this.deadlines.set(graceKey(ref.companyId, ref.userId), { companyId: ref.companyId, userId: ref.userId, at: graceUntil })
    return { after: { ...current }, graceUntil }
  }

  async set (companyId: string, userId: string, change: { status: UserPresence['status'], viewing?: Viewing | null }): Promise<Change | null> {
    const current = this.users.get(companyId)?.get(userId)
    if (!current) return null
    const before = { ...current }
    if (current.status !== change.status) {
      current.status = change.status
      current.since = this.clock()
    }
    if (change.viewing === null) delete current.viewing
    else if (change.viewing !== undefined) current.viewing = { type: change.viewing.type, id: change.viewing.id }
    if (current.status !== before.status || !sameViewing(current.viewing, before.viewing)) current.rev = this.nextRev(companyId)
    return { before, after: { ...current } }
  }

  async endGrace (companyId: string, userId: string, graceUntil: number): Promise<Offline | null> {
    const key = graceKey(companyId, userId)
    if (this.deadlines.get(key)?.at !== graceUntil) return null
    this.deadlines.delete(key)
    return this.offlineIfIdle(companyId, userId)
  }

  private offlineIfIdle (companyId: string, userId: string): Offline | null {
    const current = this.users.get(companyId)?.get(userId)
    if (!current || current.devices > 0) return null
    this.drop(companyId, userId)
    return { rev: this.nextRev(companyId) }
  }

  async refresh (refs: SocketRef[], ttlMs: number): Promise<SocketRef[]> {
    const at = this.clock() + ttlMs
    const missing: SocketRef[] = []
    for (const ref of refs) {
      const deadline = this.deadlines.get(socketKey(ref))
      if (deadline) deadline.at = at
      else missing.push(ref)
    }
    return missing
  }

  async sweep (limit: number): Promise<Expired[]> {
    const now = this.clock()
    const expired: Expired[] = []
    for (const [key, deadline] of this.deadlines) {
      if (expired.length >= limit) break
      if (deadline.at > now) continue
      this.deadlines.delete(key)
      const { companyId, userId, socketId } = deadline
      if (socketId === undefined) {
        const offline = this.offlineIfIdle(companyId, userId)
        if (offline) expired.push({ companyId, userId, after: null, rev: offline.rev })
        continue
      }
      if (!this.sockets.delete(socketId)) continue
      const current = this.users.get(companyId)?.get(userId)
      if (!current) continue
      current.devices = Math.max(0, current.devices - 1)
      current.rev = this.nextRev(companyId)
      // An expired socket already outlived any grace period: its last one means offline now.
      if (current.devices === 0) {
        this.drop(companyId, userId)
        this.deadlines.delete(graceKey(companyId, userId))
        expired.push({ companyId, userId, after: null, rev: current.rev })
      } else {
        expired.push({ companyId, userId, after: { ...current }, rev: current.rev })
      }
    }
    return expired
  }

  async list (companyId: string): Promise<Array<UserPresence & { userId: string }>> {
    return [...(this.users.get(companyId) ?? [])].map(([userId, presence]) => ({ userId, ...presence }))
  }

  async close (): Promise<void> {}
}
