import type { Envelope } from '../events.ts'

/** Where the dispatcher hands each event, in seq order per stream, exactly once per node. */
export interface Delivery {
  /** Whether any local socket listens to (or is holding) this stream. */
  hasListeners (stream: string): boolean
  deliver (envelope: Envelope): void
}

export type ReadEvents = (stream: string, afterSeq: number, limit: number) => Promise<Envelope[]>

interface StreamState {
  /** Last seq delivered on this node; undefined until the first event or head is seen. */
  last?: number
  /** Events that arrived while a gap was being filled, kept in seq order. */
  pending: Envelope[]
  filling?: Promise<void>
}

function insertSorted (list: Envelope[], envelope: Envelope) {
  let i = list.length
  while (i > 0 && list[i - 1]!.seq > envelope.seq) i--
  list.splice(i, 0, envelope)
}

/**
 * Per-node, per-stream sequencer. Events reach it from this node's commits and from other
 * nodes (Redis), in any order and possibly twice; it delivers each seq once, in order. A jump
 * (seq n+2 after n) is filled from the event log before delivering further, so a Redis outage
 * or a publisher that crashed between commit and emit leaves no hole for connected clients.
 */
export class Dispatcher {
  private readonly streams = new Map<string, StreamState>()

  constructor (
    private readonly delivery: Delivery,
    private readonly read: ReadEvents,
    private readonly onError: (err: unknown, stream: string) => void,
    private readonly pageSize = 500
  ) {}

  ingest (envelopes: Envelope[]): void {
    for (const envelope of envelopes) this.offer(envelope)
  }

  /**
   * Starts following a stream before a local socket joins it, from the head the log has now
   * (read before the join): later events are then delivered, and a jump is filled, instead of
   * whichever event happens to arrive first setting the starting point. Events arriving while
   * the head is read wait their turn. No-op for a stream already followed.
   */
  async track (stream: string, readHead: () => Promise<number>): Promise<void> {
    const existing = this.streams.get(stream)
    if (existing) {
      while (existing.filling) await existing.filling
      // Followed while nobody here listened, the stream may have missed other nodes' copies
      // (nothing fills a gap nobody listens to): start from the head the joining socket saw, or
      // the next event's gap fill would send it events from before it connected.
      if (!this.delivery.hasListeners(stream) && existing.pending.length === 0) {
        const head = await readHead()
        // Only if nothing changed meanwhile: another socket joined (it follows from here), a
        // fill started, or the sweep dropped this state.
        const unchanged = this.streams.get(stream) === existing && !existing.filling && !this.delivery.hasListeners(stream)
        if (unchanged && (existing.last === undefined || head > existing.last)) existing.last = head
      }
      return
    }
    const state = this.state(stream)
    await this.exclusive(stream, state, async () => {
      const head = await readHead()
      if (state.last === undefined) state.last = head
    }, () => {})
  }

  /**
   * Brings a stream up to `head` (from the log when events are missing). Resolves when done.
   * What cannot be read is skipped, unless `skipUnread` is false: then the stream stays where
   * the read stopped, and copies arriving later are still delivered (a duplicate at worst).
   */
  async catchUp (stream: string, head: number, { skipUnread = true }: { skipUnread?: boolean } = {}): Promise<void> {
    const state = this.state(stream)
    while (state.filling) await state.filling
    if (state.last === undefined) {
      // A node that starts, or a stream first seen, re-emits nothing: history is for sync:resume.
      state.last = head
      return
    }
    if (head > state.last && this.delivery.hasListeners(stream)) await this.fill(stream, state, head, skipUnread)
    else if (head > state.last) state.last = head
  }

  lastDelivered (stream: string): number | undefined {
    return this.streams.get(stream)?.last
  }

  private advance (state: StreamState, envelope: Envelope): void {
    state.last = envelope.seq
    this.delivery.deliver(envelope)
  }

  /** Forgets streams nobody on this node listens to (bounded memory). */
  sweep (): void {
    for (const [stream, state] of this.streams) {
      if (!state.filling && state.pending.length === 0 && !this.delivery.hasListeners(stream)) this.streams.delete(stream)
    }
  }

  get size (): number {
    return this.streams.size
  }

  private state (stream: string): StreamState {
    let state = this.streams.get(stream)
    if (!state) {
      state = { pending: [] }
      this.streams.set(stream, state)
    }
    return state
  }

  private offer (envelope: Envelope): void {
    const state = this.state(envelope.stream)
    if (state.filling) {
      insertSorted(state.pending, envelope)
      return
    }
    if (state.last !== undefined && envelope.seq <= state.last) return
    if (state.last !== undefined && envelope.seq > state.last + 1 && this.delivery.hasListeners(envelope.stream)) {
      insertSorted(state.pending, envelope)
      void this.fill(envelope.stream, state, envelope.seq - 1)
      return
    }
    this.advance(state, envelope)
  }

  private fill (stream: string, state: StreamState, upTo: number, skipUnread = true): Promise<void> {
    return this.exclusive(stream, state, async () => {
      while ((state.last ?? upTo) < upTo) {
        const want = Math.min(upTo - state.last!, this.pageSize)
        const rows = await this.read(stream, state.last!, want)
        const before = state.last
        for (const row of rows) {
          if (row.seq > upTo || row.seq <= state.last!) continue
          this.advance(state, row)
        }
        // A short page is the end of the log; a page that advanced nothing has only rows past
        // upTo (the rest of the range was pruned): reading it again would loop forever.
        if (rows.length < want || state.last === before) break
      }
    }, () => {
      // Whatever could not be read (pruned, or the database is down) is skipped: clients see
      // the seq jump and resume, or learn recovered:false. Never retried forever.
      if (skipUnread && (state.last === undefined || state.last < upTo)) state.last = upTo
    })
  }

  /**
   * Runs `work` with the stream marked busy: events offered meanwhile wait in `pending` and go
   * through `offer` again, in seq order, once it is done (after `settle`, whatever happened).
   */
  private exclusive (stream: string, state: StreamState, work: () => Promise<void>, settle: () => void): Promise<void> {
    const run = async () => {
      try {
        await work()
      } catch (err) {
        this.onError(err, stream)
      } finally {
        settle()
        state.filling = undefined
        const pending = state.pending
        state.pending = []
        for (const envelope of pending) this.offer(envelope)
      }
    }
    state.filling = run()
    return state.filling
  }
}
