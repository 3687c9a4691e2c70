import type { PresenceEntry, Viewing } from '../events.ts'

/** One socket of one user, as the presence store knows it. */
export interface SocketRef {
  companyId: string
  userId: string
  socketId: string
}

/** A user's presence in a company while at least one device is connected or the grace period runs. */
export interface UserPresence {
  status: PresenceEntry['status']
  /** Sockets across all nodes; 0 while the grace period after the last disconnect runs. */
  devices: number
  viewing?: Viewing
  /** When the current status began, ms since the epoch. */
  since: number
  /**
   * The user's revision in this company: the store raises it atomically on every mutation of the
   * user's presence, and it keeps growing across offline and back (it comes from a per-company
   * counter that outlives the user's entry), so a later state always has a higher rev.
   */
  rev: number
}

export interface Transition {
  /** null when the user had no presence (first device). */
  before: UserPresence | null
  after: UserPresence
  /**
   * The store's data epoch when the socket was recorded; it changes when the store lost its data
   * (Redis restarted empty, a flush). Passed back to `disconnect` and `endGrace`. Optional for
   * stores that cannot lose their data.
   */
  epoch?: string
}

/** A change to a user who was present before it. */
export interface Change {
  before: UserPresence
  after: UserPresence
}

export type Departure = {
  after: UserPresence
  /** Set when this was the last device: the grace deadline to pass to `endGrace`. */
  graceUntil?: number
} | {
  /** The store lost its data since the socket was recorded and no longer knows the user: offline now. */
  after: null
  rev: number
}

/** The outcome of one expired entry claimed by a sweep; `after: null` means the user went offline. */
export interface Expired {
  companyId: string
  userId: string
  after: UserPresence | null
  /** The revision of this outcome (`after.rev`, or the offline's own rev). */
  rev: number
}

/**
 * A sweep whose claims partly failed. Claims remove their entries as they succeed, so the
 * successful ones (`claimed`) must still be announced: nobody else will.
 */
export class PartialSweepError extends AggregateError {
  constructor (errors: unknown[], public readonly claimed: Expired[]) {
    super(errors, `presence sweep: ${errors.length} of ${errors.length + claimed.length} claims failed`)
    this.name = 'PartialSweepError'
  }
}

/** A user who went offline: the revision of that change. */
export interface Offline {
  rev: number
}

/**
 * Where presence lives. Every mutation is atomic with respect to other nodes sharing the store,
 * and every expiry is claimed by exactly one caller, so exactly one node announces it. Clocks
 * are the store's (Redis `TIME` for the Redis store), not the caller's.
 */
export interface PresenceStore {
  readonly kind: 'memory' | 'redis'
  /** Adds (or re-adds) a socket whose entry expires `ttlMs` from now; cancels a running grace period. */
  connect (ref: SocketRef, ttlMs: number): Promise<Transition>
  /**
   * Removes a socket; on the last one the user enters a grace period of `graceMs`. null when
   * unknown, unless it was recorded (`epoch` given), no sweep claimed it (its data was lost or
   * rolled back) and the store has no entry for the user: then the user is offline, with a new
   * rev (`after: null`).
   */
  disconnect (ref: SocketRef, graceMs: number, epoch?: string): Promise<Departure | null>
  /** Sets status and viewing (`undefined` keeps it, `null` clears it). null when the user is unknown. */
  set (companyId: string, userId: string, change: { status: UserPresence['status'], viewing?: Viewing | null }): Promise<Change | null>
  /**
   * Ends the grace period that `disconnect` started at `graceUntil`: the offline's rev when the
   * user is now offline, else null. Also an offline when the grace period is gone without a
   * sweep having ended it (the store lost or rolled back its data) and it has no entry for the user.
   */
  endGrace (companyId: string, userId: string, graceUntil: number, epoch?: string): Promise<Offline | null>
  /** Pushes the expiry of live sockets `ttlMs` ahead; returns the ones the store no longer has. */
  refresh (refs: SocketRef[], ttlMs: number): Promise<SocketRef[]>
  /** Claims up to `limit` expired sockets and grace periods, removing them. */
  sweep (limit: number): Promise<Expired[]>
  /** Everyone present in a company, including users in their grace period (devices 0). */
  list (companyId: string): Promise<Array<UserPresence & { userId: string }>>
  /** Releases what the store created (not connections it was given). */
  close (): Promise<void>
}

export const sameViewing = (a: Viewing | undefined, b: Viewing | undefined): boolean =>
  a === b || (a !== undefined && b !== undefined && a.type === b.type && a.id === b.id)
